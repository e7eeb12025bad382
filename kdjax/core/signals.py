"""Stop requests from signals: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 end a training phase cleanly.

Schedulers announce the end of a job with a signal and kill it a little later: SLURM sends SIGTERM (and
SIGUSR1 ahead of the time limit with `--signal=USR1@SECONDS`), Kubernetes and most batch systems
SIGTERM, a TPU VM SIGTERM on preemption; a person presses Ctrl-C. While `StopSignals` is active, the
first such signal only *asks* the training loop to stop: it finishes the step in flight, saves a
checkpoint of the step reached, waits for it to be written and returns, so a relaunch loses nothing. A
second signal of the same kind acts as it would without kdjax (SIGINT raises KeyboardInterrupt,
SIGTERM/SIGUSR1 end the process at once).

Multi-process runs must stop at the same step in every process. There JAX's preemption service (on by
default with `jax.distributed`) already catches SIGTERM in every process and agrees on a step through its
coordination service (`multihost_utils.reached_preemption_sync_point`, which Orbax's
`CheckpointManager.reached_preemption` asks). So in a multi-process run SIGTERM is left to JAX, and
SIGINT/SIGUSR1 are handed to it by re-raising them as SIGTERM; `stop_at(step, ...)` then answers from the
sync point alone. When the preemption service is off, every process shares its own flag at every step
(`process_allgather`), so they still stop together.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def jax_handles_sigterm() -> bool:
    """True in a multi-process run with JAX's preemption service, which owns SIGTERM there."""
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class StopSignals:
    """`with StopSignals() as stop:` turns the first STOP_SIGNALS into a stop request (module docstring).

    Handlers are installed only from the main thread (Python's rule); elsewhere the block runs without
    them. The previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.received: str | None = None  # the name of the first stop signal received
        self._previous: dict[int, Callable | int | None] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if sig == signal.SIGTERM and jax_handles_sigterm():
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received == name:  # the second one: what it would have done without us
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = self.received or name
        logging.warning("kdjax: received %s: stopping after the current step with a checkpoint (send it again "
                        "to stop at once).", name)
        if jax_handles_sigterm():
            signal.raise_signal(signal.SIGTERM)  # JAX's preemption notifier tells every process

    def stop_at(self, step: int, reached_preemption: Callable[[int], bool]) -> bool:
        """Whether the loop stops after `step`: the same answer in every process.

        Args:
          reached_preemption: the preemption sync point (Orbax's `CheckpointManager.reached_preemption`),
            which every process must ask at every step.
        """
        if reached_preemption(step):
            return True
        if jax.process_count() == 1:
            return self.received is not None
        if jax_handles_sigterm():
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        return bool(np.any(flags))
