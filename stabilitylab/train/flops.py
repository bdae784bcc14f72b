"""FLOPs of a training step, the measured matmul FLOP/s, and model FLOP utilisation (MFU).

A trainer wraps each training step in :meth:`ThroughputMeter.step`. The first step a process
trains runs under :func:`count_flops`, and every later step is timed. At the end of the run,
:meth:`ThroughputMeter.summary` divides the FLOPs of the timed steps by their time. It
compares that rate with :func:`measure_matmul_flops`, the dense matmul rate this process
reaches on the same device and dtype, and with :func:`peak_flops`, the vendor's dense peak
of a known GPU.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# The matmul dtype of each --precision. bf16 and fp16 autocast cast the inputs of linear
# layers and matmuls to that dtype, and fp32 leaves them in float32.
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Sides of the square matmuls that measure_matmul_flops tries. The CPU uses the largest whose
# repeats fit the time budget, which is 512 only where a 1024 call is too slow (bf16 on a CPU
# without bf16 instructions). A GPU uses one side large enough to keep every SM busy.
CPU_MATMUL_SIZES = (512, 1024, 2048, 4096)
CUDA_MATMUL_SIZE = 8192


# -- counting ----------------------------------------------------------------------------------


def _attention_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def _cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    """Return FLOP formulas for the CPU flash-attention kernels, which torch leaves uncounted.

    torch 2.14 registers formulas for the CUDA attention kernels only, so the attention of a
    timm ViT on the CPU would count 0. The CUDA kernels' formulas apply unchanged: the
    arguments start with the same query, key and value tensors.
    """
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _attention_forward_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _attention_backward_flops
        )
    return formulas


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())


def count_flops(fn: Callable[[], object]) -> int:
    """Call ``fn()`` once and return the FLOPs of its matmuls, convolutions and attention.

    The count comes from ``torch.utils.flop_counter.FlopCounterMode``, which applies a
    formula to the shapes of each aten operator that runs, forward and backward alike. A
    matmul of an (m, k) by a (k, n) matrix counts 2*m*k*n (a multiply and an add per term),
    and so do bmm and addmm, whose bias addition is not counted. A convolution counts 2 per
    multiply-accumulate, and scaled-dot-product attention counts its two matmuls forward and
    five backward (the kernel recomputes the scores). Elementwise operators, normalisation,
    softmax, reductions and the optimiser count 0, so the result is the model FLOPs that MFU
    is defined with.

    The counter only reads the shapes of the operators as they pass, so ``fn()`` computes
    the same values as an uncounted call (tests/test_flops.py checks a training step bit for
    bit). NOTE: TorchDynamo compiles nothing while a dispatch mode such as this counter is
    active (seen with torch 2.14), so a ``torch.compile`` function runs eagerly here. Its
    count is the same, but its rounding is that of eager mode.
    """
    with _flop_counter() as counter:
        fn()
    return counter.get_total_flops()


# -- the machine's matmul rate -------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_matmuls(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, calls: int, device: torch.device
) -> float:
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b, out=out)
    _synchronize(device)
    return time.perf_counter() - started


def _operands(
    size: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return a, b, torch.empty(size, size, dtype=dtype, device=device)


def measure_matmul_flops(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    size: int | None = None,
    repeats: int = 5,
    budget_seconds: float = 1.5,
) -> float:
    """Measure the dense matmul FLOP/s this process reaches on ``device`` in ``dtype``.

    A square matmul of side n counts 2*n^3 FLOPs, as in :func:`count_flops`. After a warm-up
    call, one timed call sets how many calls make up a repeat, so that the ``repeats``
    repeats together take about ``budget_seconds``. The best repeat gives the rate. Without
    ``size``, the CPU uses the largest side of :data:`CPU_MATMUL_SIZES` whose single call fits
    in one repeat's share of the budget, and a GPU uses :data:`CUDA_MATMUL_SIZE`. Each repeat
    is timed between two ``torch.cuda.synchronize`` calls on a GPU.

    The rate depends on the threads torch uses on the CPU (``torch.get_num_threads()``) and,
    for float32 on a GPU, on whether TF32 matmuls are allowed. Raises ValueError for a
    dtype that is not floating point or a size, repeat count or budget that is not positive.
    """
    device = torch.device(device)
    if not dtype.is_floating_point:
        raise ValueError(f"matmul dtype {dtype} is not floating point; pass e.g. torch.float32")
    if size is not None and size < 1:
        raise ValueError(f"matmul size {size} must be a positive side length")
    if repeats < 1:
        raise ValueError(f"repeats {repeats} must be at least 1")
    if not budget_seconds > 0:
        raise ValueError(f"budget_seconds {budget_seconds} must be positive")
    if size is not None:
        sizes: tuple[int, ...] = (size,)
    elif device.type == "cuda":
        sizes = (CUDA_MATMUL_SIZE,)
    else:
        sizes = CPU_MATMUL_SIZES
    share = budget_seconds / repeats

    # Time one call of the smallest side, then move up while the next side's call, estimated
    # from the n^3 cost, still fits in one repeat's share of the budget.
    side = sizes[0]
    a, b, out = _operands(side, dtype, device)
    _time_matmuls(a, b, out, 1, device)  # warm-up: allocation, library and kernel selection
    one_call = _time_matmuls(a, b, out, 1, device)
    for candidate in sizes[1:]:
        if one_call * (candidate / side) ** 3 > share:
            break
        side = candidate
        a, b, out = _operands(side, dtype, device)
        _time_matmuls(a, b, out, 1, device)
        one_call = _time_matmuls(a, b, out, 1, device)

    # A call slower than a repeat's share makes each repeat one call, and the repeats are cut
    # to those that fit the budget, at least one.
    calls = max(1, int(share / max(one_call, 1e-9)))
    repeats = max(1, min(repeats, int(budget_seconds / max(one_call * calls, 1e-9))))
    best = min(_time_matmuls(a, b, out, calls, device) for _ in range(repeats))
    return 2 * side**3 * calls / best


# -- vendor peaks ----------------------------------------------------------------------------

# Dense peaks in FLOP/s from NVIDIA's datasheets. For BF16, FP16 and TF32 the datasheets print
# the rate with 2:4 structured sparsity, twice the dense rate: the H100 SXM's "1,979 TFLOPS"
# BF16 is 989.5 TFLOP/s dense. FP32 is the rate without Tensor Cores. The H200 SXM has the
# H100 SXM's compute. Keys: "bf16", "fp16", "tf32" (float32 matmuls with TF32 allowed), "fp32".
_HOPPER_SXM = {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12}
_PEAKS: tuple[tuple[re.Pattern[str], dict[str, float]], ...] = (
    (
        re.compile(r"\bH100\b.*\bPCIe\b"),
        {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51e12},
    ),
    # "NVIDIA H100 80GB HBM3" and "NVIDIA H200" are the SXM boards. The NVL boards have
    # other figures, so they are left out.
    (re.compile(r"\bH100\b(?!.*\b(PCIe|NVL)\b)"), _HOPPER_SXM),
    (re.compile(r"\bH200\b(?!.*\bNVL\b)"), _HOPPER_SXM),
    # The SXM4 and PCIe A100, 40 and 80 GB, share these figures.
    (re.compile(r"\bA100\b"), {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (
        re.compile(r"\bL40S\b"),
        {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    ),
    # Only the L4's 16-bit Tensor Core rate is listed here.
    (re.compile(r"\bL4\b"), {"bf16": 121e12, "fp16": 121e12}),
)


def _tf32_matmuls() -> bool:
    """Tell whether float32 matmuls on CUDA may run as TF32 on Tensor Cores."""
    # torch 2.9 added fp32_precision, and "none" means it is unset, so the older flag
    # decides. Reading the older flag after the newer one was set raises.
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _peak_key(dtype: torch.dtype) -> str | None:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "tf32" if _tf32_matmuls() else "fp32"
    return None


def peak_flops_for_name(device_name: str, dtype: torch.dtype) -> float | None:
    """Return the vendor's dense peak FLOP/s of the GPU named ``device_name``, or None.

    ``device_name`` is as ``torch.cuda.get_device_name`` returns it. None stands for a GPU
    not in the table, a MIG slice (which has only part of the GPU's SMs) and a dtype with no
    listed rate.
    """
    key = _peak_key(dtype)
    if key is None or "MIG" in device_name:
        return None
    for pattern, peaks in _PEAKS:
        if pattern.search(device_name):
            return peaks.get(key)
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Return the vendor's dense peak FLOP/s of ``device`` in ``dtype``, None on the CPU.

    See :func:`peak_flops_for_name` for the GPUs that are known.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


# -- timing the steps --------------------------------------------------------------------------


class _EventClock:
    """Device time of CUDA work between pairs of events, read back without a host sync.

    An event records on the current stream when the step starts and when it ends. The
    elapsed time of a pair is read once the end event has completed, which
    ``Event.query()`` checks without waiting.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self.spare: list[torch.cuda.Event] = []

    def _record(self) -> torch.cuda.Event:
        event = self.spare.pop() if self.spare else torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> torch.cuda.Event:
        return self._record()

    def stop(self, start: torch.cuda.Event) -> None:
        self.pending.append((start, self._record()))
        self.collect(wait=False)

    def collect(self, wait: bool) -> None:
        """Add the completed pairs to ``seconds``, waiting for all of them with ``wait``."""
        while self.pending:
            start, end = self.pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self.pending.popleft()
            self.seconds += start.elapsed_time(end) / 1000
            self.spare.extend((start, end))


class ThroughputMeter:
    """FLOPs of one training step, the time of the steps after it, and the end-of-run line.

    Wrap every training step in :meth:`step`. The first call runs the step under
    :func:`count_flops` and is not timed, because counting slows the step down and a first
    step carries one-time costs (allocation, kernel selection). The next ``warmup_steps``
    calls run untimed as well, and each later call is one timed step. A ``torch.compile``
    step compiles in the first call after the counted one, because TorchDynamo compiles
    nothing under the counter, so pass ``warmup_steps`` of 1 or more for it.

    The achieved FLOP/s is ``flops_per_step * steps / seconds()``, where ``seconds()`` sums
    the duration of the timed steps alone. On a CUDA device a step lasts from an event
    recorded on the current stream as it starts to one recorded as it ends, which is the
    device time of the step's kernels and the gaps between them. On the CPU it is the wall
    time of the call. Data loading, evaluation, flushes and checkpoints between steps are
    left out, so the rate is that of the training step, not of the whole run.
    """

    def __init__(self, device: torch.device | str, warmup_steps: int = 0) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps {warmup_steps} must be 0 or more")
        self.device = torch.device(device)
        self.warmup_steps = warmup_steps
        self.flops_per_step: int | None = None
        self.steps = 0
        self._untimed_left = warmup_steps
        self._seconds = 0.0
        self._events = _EventClock(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Count the FLOPs of the step run inside, skip a warm-up step, or time the step.

        A step that raises is neither counted nor timed, nor does it use up a warm-up step.
        """
        if self.flops_per_step is None:
            with _flop_counter() as counter:
                yield
            self.flops_per_step = counter.get_total_flops()
            return
        if self._untimed_left > 0:
            yield
            self._untimed_left -= 1
            return
        if self._events is not None:
            start = self._events.start()
            yield
            self._events.stop(start)
        else:
            started = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - started
        self.steps += 1

    def add(self, seconds: float, steps: int = 1) -> None:
        """Add ``steps`` steps timed elsewhere, which took ``seconds`` together."""
        if seconds < 0 or steps < 0:
            raise ValueError(f"cannot add {steps} steps of {seconds} s: both must be >= 0")
        self._seconds += seconds
        self.steps += steps

    def seconds(self) -> float:
        """Return the summed time of the timed steps, waiting for those still on the device."""
        if self._events is None:
            return self._seconds
        self._events.collect(wait=True)
        return self._seconds + self._events.seconds

    def achieved_flops(self) -> float | None:
        """Return the FLOP/s of the timed steps, or None before any step is counted and timed."""
        seconds = self.seconds()
        if self.flops_per_step is None or self.steps == 0 or seconds <= 0:
            return None
        return self.flops_per_step * self.steps / seconds

    def to_dict(
        self, matmul_flops: float | None = None, peak: float | None = None
    ) -> dict[str, float | int | None]:
        """Return the figures of :meth:`summary` as a JSON-ready dictionary."""
        achieved = self.achieved_flops()
        return {
            "flops_per_step": self.flops_per_step,
            "timed_steps": self.steps,
            "timed_seconds": self.seconds(),
            "achieved_flops": achieved,
            "matmul_flops": matmul_flops,
            "peak_flops": peak,
            "mfu_of_matmul": _ratio(achieved, matmul_flops),
            "mfu_of_peak": _ratio(achieved, peak),
        }

    def summary(self, matmul_flops: float | None = None, peak: float | None = None) -> str:
        """Format the end-of-run line: FLOPs per step, achieved FLOP/s and the MFU.

        ``matmul_flops`` is a :func:`measure_matmul_flops` result and ``peak`` a
        :func:`peak_flops` result. The MFU is the achieved rate as a fraction of each one
        that is given.
        """
        if self.flops_per_step is None:
            return "training step FLOPs: not counted, because no step ran"
        seconds = self.seconds()
        text = f"training step FLOPs: {format_si(self.flops_per_step)}FLOP per step"
        if self.steps == 0:
            if self.warmup_steps == 0:
                return text + ", no timed steps (the first step is counted, not timed)"
            return text + (
                f", no timed steps (the counted first step and {self.warmup_steps} warm-up "
                "steps are not timed)"
            )
        plural = "s" if self.steps != 1 else ""
        text += f", {self.steps} timed step{plural} in {seconds:.3g} s"
        achieved = self.achieved_flops()
        if achieved is None:
            return text
        text += f", {format_si(achieved)}FLOP/s achieved"
        fractions = []
        if matmul_flops is not None:
            fractions.append(
                f"{_percent(achieved, matmul_flops)} of the measured matmul rate "
                f"({format_si(matmul_flops)}FLOP/s)"
            )
        if peak is not None:
            fractions.append(
                f"{_percent(achieved, peak)} of the vendor peak ({format_si(peak)}FLOP/s)"
            )
        if fractions:
            text += "; MFU " + ", ".join(fractions)
        return text


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def _percent(value: float, reference: float) -> str:
    return f"{100 * value / reference:.1f}%"


_SI_PREFIXES = ("", "k", "M", "G", "T", "P", "E")


def format_si(value: float) -> str:
    """Format ``value`` with three significant digits and an SI prefix, e.g. ``"16.4 G"``."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g} "
    top = len(_SI_PREFIXES) - 1
    exponent = min(max(math.floor(math.log10(abs(value)) / 3), 0), top)
    # 999.7 rounds to 1e+03 at three digits, which reads better as 1 with the next prefix.
    if abs(float(f"{value / 1000**exponent:.3g}")) >= 1000 and exponent < top:
        exponent += 1
    return f"{value / 1000**exponent:.3g} {_SI_PREFIXES[exponent]}"
