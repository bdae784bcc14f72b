"""SIGINT and SIGTERM during training, handled at the end of an optimiser step.

Python raises KeyboardInterrupt wherever the main thread happens to be, which could be
between the optimiser step and the momentum-encoder update. A checkpoint written from there
would not resume exactly. :class:`DeferredInterrupts` records the first signal instead, and
the training loop calls :meth:`DeferredInterrupts.check` once a step is complete, which
raises :class:`StepInterrupt`. The loop then flushes the metrics and writes a checkpoint at
that step. A second signal raises :class:`ForcedInterrupt` at once: nothing more is written
and the last checkpoint stays the one to resume from.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from stabilitylab.train import distributed

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StepInterrupt(KeyboardInterrupt):
    """A signal handled after a complete optimiser step, so the run can be checkpointed."""

    def __init__(self, signal_number: int, message: str = "") -> None:
        super().__init__(message or signal.Signals(signal_number).name)
        self.signal_number = signal_number


class ForcedInterrupt(KeyboardInterrupt):
    """A second signal, which stops the run in the middle of a step without a checkpoint."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class DeferredInterrupts:
    """Context manager that defers SIGINT and SIGTERM to :meth:`check`.

    Signal handlers can only be installed from the main thread. In another thread the
    context installs nothing and Python's own handling applies.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredInterrupts:
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        name = signal.Signals(signal_number).name
        if self.signal_number is not None:
            log.warning("%s received again: stopping at once, without a checkpoint", name)
            raise ForcedInterrupt(signal_number)
        self.signal_number = signal_number
        log.warning(
            "%s received: stopping after the current step, with a checkpoint; send it again "
            "to stop at once without one",
            name,
        )

    def check(self) -> None:
        """Raise StepInterrupt when a signal arrived; call it between optimiser steps.

        Under torchrun the processes agree first, on the CPU: a signal that reached any of
        them stops all of them after the same step, so they write one checkpoint together.
        """
        number = self.signal_number or 0
        if distributed.world_size() > 1:
            number = distributed.max_over_processes(number)
        if number:
            raise StepInterrupt(number)
