"""Handlers for the signals that stop a job, installed for the span of a piece of work and taken down after it.

SIGTERM is how `kill` and job schedulers (Slurm's preemption, Kubernetes) stop a process; SIGHUP is what it gets when
its terminal closes or its ssh connection drops. Python's default for both ends the process on the spot, leaving
half-written folders and losing the steps trained since the last checkpoint.

Only a process's main thread may install handlers (the preview runs work in threads of its own and stops it itself):
elsewhere nothing changes. A signal the process was started to ignore (`nohup` ignores SIGHUP) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def handling_stop_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """While inside, `handler(signum, frame)` takes the stop signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            # None: a handler installed outside Python; the default is the nearest we can restore
            signal.signal(signum, handler_before if handler_before is not None else signal.SIG_DFL)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside, a stop signal raises SystemExit with the exit status of a process that signal ended (143, 129),
    so that `finally` blocks and `except BaseException` clean-ups run on the way out."""

    def exit_with_signal_status(signum, frame):
        raise SystemExit(128 + signum)

    with handling_stop_signals(exit_with_signal_status):
        yield

