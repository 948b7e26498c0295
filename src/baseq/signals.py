"""Stop signals during a run: SIGTERM (Slurm preemption or time limit, `kill`) ends the run through an
exception, so that the run's record is written on the way out (`preempted`), instead of the process
dying with a `running` record. Ctrl-C already raises KeyboardInterrupt (the record says `failed`).

Under submitit (launcher=slurm, submitit_local) the launcher owns the signals: its SIGUSR2 handler (the
preemption/time-limit warning) checkpoints the job, requeues it and exits with SystemExit, and it ignores
SIGTERM. Those handlers keep running; this module only notes which signal arrived, so that the run can
tell "stopped by the scheduler" from a failure."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Preempted(BaseException):
    """The run was stopped by SIGTERM. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it."""


def _preemption_signal() -> signal.Signals:
    # submitit's own setting for its preemption signal (default USR2)
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG"))


@contextmanager
def stop_signals_raise() -> Iterator[list[str]]:
    """While open, SIGTERM raises Preempted, unless a handler of its own is installed (then that one runs);
    the launcher's preemption signal handler, if any, runs as before. Yields the names of the signals
    received. Outside the main thread (where Python cannot handle signals) it does nothing."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous: dict[int, object] = {}

    def on_signal(signum: int, frame) -> None:
        first = not received
        received.append(signal.Signals(signum).name)
        chained = previous[signum]
        if callable(chained):
            chained(signum, frame)   # e.g. submitit: checkpoint, requeue, exit
        elif first:   # once: a second SIGTERM must not interrupt the writing of the record
            raise Preempted(f"stopped by {signal.Signals(signum).name}")

    for sig in dict.fromkeys((signal.SIGTERM, _preemption_signal())):
        handler = signal.getsignal(sig)
        if handler is signal.SIG_DFL and sig == signal.SIGTERM or callable(handler):
            previous[sig] = handler
            signal.signal(sig, on_signal)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
