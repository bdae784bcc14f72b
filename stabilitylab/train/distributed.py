"""Training on several processes with PyTorch's distributed engine, started by ``torchrun``.

``torchrun --nproc_per_node N -m stabilitylab run ...`` starts N copies of the command and
sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each.
:func:`init_from_environment` reads them and joins the process group: NCCL when the run
trains on CUDA, gloo on the CPU. Every process trains on its share of each global batch
under ``DistributedDataParallel``, which averages the gradients during backward.

What the methods exchange goes through the functions here, which return their input
unchanged in a single process:

- :func:`gather` concatenates a tensor over the processes in rank order, without gradient
  (MoCo v3's keys, the kNN features, the dense kNN queue, SwAV's queue);
- :func:`gather_with_grad` does the same with gradient flowing back to every process's
  input (SimCLR's negatives);
- :func:`all_reduce_sum` and :func:`all_reduce_mean`, without gradient (SwAV's
  Sinkhorn-Knopp sums, DINO's centre, the recorded loss).

BatchNorm in the heads must see the global batch. On CUDA the heads use PyTorch's
``SyncBatchNorm``, which refuses CPU tensors, so on the CPU :class:`GlobalBatchNorm1d`
all-reduces the batch mean and variance itself, with gradient, through the same process
group (see :func:`synchronise_batch_norm`).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from stabilitylab.errors import ConfigError, PeerError, StabilityLabError
from stabilitylab.launch import launched_by_torchrun

T = TypeVar("T")
log = logging.getLogger(__name__)

# The variables torchrun sets in every process it starts.
ENVIRONMENT_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How long a collective waits for the other processes before the run fails.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# While it joins the group, a process checks for Ctrl-C every JOIN_POLL_SECONDS and logs
# that it is still waiting every JOIN_LOG_SECONDS.
JOIN_POLL_SECONDS = 0.2
JOIN_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the training processes."""

    rank: int
    local_rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes the run directory."""
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        """Describe the group for the run's environment record.

        ``launcher`` is ``torchrun`` when torchrun's elastic agent started the processes
        (it sets ``TORCHELASTIC_RUN_ID``), else ``environment``, as with a scheduler that
        sets RANK and WORLD_SIZE itself. The environment's ``command`` is then the argv of
        one worker, which torchrun does not pass on, and these fields give the rest.
        """
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "environment",
            "nodes": _optional_int("GROUP_WORLD_SIZE"),
            "processes_per_node": _optional_int("LOCAL_WORLD_SIZE"),
            "master": f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}",
        }


def _optional_int(name: str) -> int | None:
    """Return the integer in the environment variable ``name``, None when unset or invalid."""
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


SINGLE_PROCESS = ProcessGroup(rank=0, local_rank=0, world_size=1, backend="none")


def _environment_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"the environment variable {name}={value!r} is not an integer; start the run with "
            "torchrun, which sets it, or unset RANK and WORLD_SIZE to train in one process"
        ) from None


def init_from_environment(device_name: str) -> ProcessGroup:
    """Join the process group torchrun described and return it.

    ``device_name`` is the run's ``--device``. ``auto`` and ``cuda`` make each process use
    the GPU of its local rank with NCCL, and ``cpu`` makes it train on the CPU with gloo
    (:func:`process_device` gives the device). A single process (no torchrun, or
    ``WORLD_SIZE=1``) joins nothing.
    """
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    missing = [key for key in ENVIRONMENT_KEYS if key not in os.environ]
    world_size = _environment_int("WORLD_SIZE")
    rank = _environment_int("RANK")
    local_rank = _environment_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"RANK={rank} and WORLD_SIZE={world_size} do not describe a process group; start "
            "the run with torchrun"
        )
    if world_size == 1:
        return SINGLE_PROCESS
    if missing:
        raise ConfigError(
            f"the environment variables {', '.join(missing)} are missing, and torchrun sets "
            "them; start the run with torchrun --nproc_per_node N -m stabilitylab run ..."
        )
    use_cuda = device_name.startswith("cuda") or (
        device_name == "auto" and torch.cuda.is_available()
    )
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device_name} requested but no CUDA GPU is available; pass "
                "--device cpu to train on the CPU with the gloo backend"
            )
        if device_name not in ("auto", "cuda"):
            raise ConfigError(
                f"--device {device_name} names one GPU, but under torchrun every process uses "
                "the GPU of its local rank; pass --device cuda"
            )
        if local_rank >= torch.cuda.device_count():
            error = ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} are visible; "
                "pass a --nproc_per_node of at most the number of GPUs per node"
            )
            error.process_specific = True  # type: ignore[attr-defined]
            raise error
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    port = os.environ["MASTER_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"MASTER_PORT={port!r} is not a port number; pass torchrun a --master_port from "
            "1 to 65535"
        )
    if not dist.is_initialized():
        log.info(
            "rank %d: joining %d processes at %s:%s (%s); this waits until all of them start",
            rank,
            world_size,
            os.environ["MASTER_ADDR"],
            port,
            backend,
        )
        _join_group(rank, local_rank, world_size, backend)
    return ProcessGroup(rank, local_rank, world_size, backend)


def _join_group(rank: int, local_rank: int, world_size: int, backend: str) -> None:
    """Call ``init_process_group`` in a helper thread, so that Ctrl-C can stop the wait.

    The rendezvous blocks in C++ until every process has started, and a signal reaches
    Python only when it returns. The main thread waits here instead, logs every
    :data:`JOIN_LOG_SECONDS` how long it has waited, and takes Ctrl-C or SIGTERM at once.
    """
    failures: list[BaseException] = []

    def join() -> None:
        try:
            if backend == "nccl":
                torch.cuda.set_device(local_rank)  # the current GPU is set per thread
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=COLLECTIVE_TIMEOUT,
                device_id=torch.device("cuda", local_rank) if backend == "nccl" else None,
            )
        except BaseException as error:  # handed to the main thread, which raises it
            failures.append(error)

    # A daemon thread, so that a process interrupted during the wait can exit.
    thread = threading.Thread(target=join, name="stabilitylab-join", daemon=True)
    started = time.monotonic()
    thread.start()
    logged = started
    while thread.is_alive():
        thread.join(JOIN_POLL_SECONDS)
        now = time.monotonic()
        if thread.is_alive() and now - logged >= JOIN_LOG_SECONDS:
            logged = now
            log.warning(
                "rank %d: still waiting after %.0f s for the other processes (%d in all) at %s:%s. "
                "Every process of the run must start; a run of one process must not have "
                "RANK and WORLD_SIZE set (here RANK=%s, WORLD_SIZE=%s): unset them",
                rank,
                now - started,
                world_size,
                os.environ["MASTER_ADDR"],
                os.environ["MASTER_PORT"],
                os.environ["RANK"],
                os.environ["WORLD_SIZE"],
            )
    if not failures:
        return
    error = failures[0]
    if isinstance(error, dist.DistNetworkError | dist.DistStoreError):
        # Such as the port in use by another program, or an address that does not resolve.
        lines = str(error).strip().splitlines()
        failure = ConfigError(
            f"rank {rank} could not join the process group at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']}: {lines[0] if lines else type(error).__name__}. "
            "If another program uses the port, pass torchrun another --master_port"
        )
        failure.process_specific = True  # type: ignore[attr-defined]
        raise failure from error
    raise error


# Words of the errors gloo raises when the connection to another process breaks. Gloo
# raises a plain RuntimeError; NCCL and the store raise torch.distributed.DistError.
_GLOO_PEER_FAILURE = ("gloo/transport", "Connection reset by peer", "Connection closed by peer")


def is_peer_failure(error: BaseException) -> bool:
    """Return whether ``error`` reports that a collective lost another process of the group."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(
        words in str(error) for words in _GLOO_PEER_FAILURE
    )


def current() -> ProcessGroup:
    """Return this process's group, :data:`SINGLE_PROCESS` outside a distributed run."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    world_size = dist.get_world_size()
    if world_size == 1:
        return SINGLE_PROCESS
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return ProcessGroup(rank, local_rank, world_size, str(dist.get_backend()))


def world_size() -> int:
    return current().world_size


def rank() -> int:
    return current().rank


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) of every process along dim 0 in rank order, no gradient.

    Every process must pass the same shape.
    """
    if world_size() == 1:
        return tensor
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """Concatenation over the processes whose backward pass hands each its rows' gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        first = dist.get_rank() * ctx.rows
        return total[first : first + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) of every process in rank order, keeping the gradient.

    The backward pass sums each process's gradient of the result and hands every process the
    rows of its own input, so a loss that reads other processes' rows trains them too.
    """
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather`, for tensors whose first dimension differs between processes."""
    if world_size() == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = gather(count).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = gather(padded).split(max(counts))
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Return the sum of ``tensor`` over the processes (a new tensor), no gradient."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Return the mean of ``tensor`` over the processes (a new tensor), no gradient."""
    if world_size() == 1:
        return tensor
    return all_reduce_sum(tensor) / dist.get_world_size()


def max_over_processes(value: int) -> int:
    """Return the largest of every process's host integer ``value``.

    The exchange goes through :func:`control_group` on the CPU, so on CUDA it adds no device
    sync.
    """
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=control_group())
    return int(tensor.item())


_CONTROL_GROUP: Any = None


def control_group() -> Any:
    """Return a gloo group over all processes for host values, created on first use.

    With NCCL the default group only carries CUDA tensors; host flags travel through this one.
    """
    global _CONTROL_GROUP
    if dist.get_backend() == "gloo":
        return None  # the default group
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def broadcast_object(value: Any) -> Any:
    """Return rank 0's ``value`` in every process (a picklable host object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Return every process's ``value`` in rank order (a picklable host object)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=control_group())
    return values


class _AllReduceSum(torch.autograd.Function):
    """Autograd sum over the processes; the backward pass sums the processes' gradients too."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the batches of every process.

    The CPU counterpart of ``SyncBatchNorm``: the batch mean, then the mean squared
    deviation from it, are all-reduced with gradient, so the output and its gradient equal
    those of one BatchNorm over the global batch. Two all-reduces of C values per call. In
    one process, or in eval mode, it is an ordinary BatchNorm1d.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(input)
        if input.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C) inputs, got {tuple(input.shape)}")
        values = input.float()
        count = input.shape[0] * world_size()
        mean = all_reduce_sum_with_grad(values.sum(dim=0)) / count
        variance = all_reduce_sum_with_grad(((values - mean) ** 2).sum(dim=0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 0.1
                unbiased = variance * count / max(count - 1, 1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        output = (values - mean) / torch.sqrt(variance + self.eps)
        if self.affine:
            output = output * self.weight + self.bias
        return output


def synchronise_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm1d of ``module`` by one whose statistics span the processes.

    CUDA gets ``SyncBatchNorm``; the CPU :class:`GlobalBatchNorm1d`. Parameters, buffers and
    ``requires_grad`` carry over. A single process keeps its modules as they are.
    """
    if world_size() == 1:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace_batch_norm(module)


def _replace_batch_norm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        replacement = GlobalBatchNorm1d(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        with torch.no_grad():
            if module.affine:
                replacement.weight.copy_(module.weight)
                replacement.bias.copy_(module.bias)
                replacement.weight.requires_grad_(module.weight.requires_grad)
                replacement.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats:
                replacement.running_mean.copy_(module.running_mean)
                replacement.running_var.copy_(module.running_var)
                replacement.num_batches_tracked.copy_(module.num_batches_tracked)
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, _replace_batch_norm(child))
    return module


def shard_indices(size: int, group: ProcessGroup) -> Sequence[int]:
    """Return the indices of ``size`` items that ``group``'s process handles: every N-th one."""
    return range(group.rank, size, group.world_size)


def rank_seed(seed: int, rank: int) -> int:
    """Return the seed of the random streams of process ``rank``; rank 0 keeps ``seed``."""
    if rank == 0:
        return seed
    import numpy as np

    state = np.random.SeedSequence((seed, rank)).generate_state(1, dtype=np.uint32)
    return int(state[0])


def join(device_name: str) -> ProcessGroup:
    """Return this process's group, joining the one torchrun describes if not joined yet."""
    group = current()
    if group.world_size > 1 or not launched_by_torchrun():
        return group
    return init_from_environment(device_name)


def process_device(group: ProcessGroup, device_name: str) -> torch.device:
    """Return the device this process trains on: ``--device``, or its local GPU under torchrun."""
    from stabilitylab.train.environment import resolve_device

    if group.world_size == 1:
        return resolve_device(device_name)
    if group.backend == "nccl":
        return torch.device("cuda", group.local_rank)
    return torch.device("cpu")


def on_main(action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 and return its result (a picklable value) in every process.

    A user error raised by ``action`` stops every process: rank 0 raises it, the others a
    :class:`PeerError` with its message. Every process must call this at the same point.
    """
    group = current()
    if group.world_size == 1:
        return action()
    outcome: tuple[str, Any]
    if group.is_main:
        try:
            result = action()
        except StabilityLabError as error:
            broadcast_object(("error", str(error)))
            raise
        except BaseException as error:
            broadcast_object(("error", f"{type(error).__name__} on rank 0: {error}"))
            raise
        broadcast_object(("ok", result))
        return result
    outcome = broadcast_object(None)
    if outcome[0] == "error":
        raise PeerError(outcome[1])
    return outcome[1]
