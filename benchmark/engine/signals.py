"""What signals ask of the running loop, as one object: a checkpoint (preemption:
submitit's ``checkpoint()`` or SIGUSR1) and a stop (SIGINT/SIGTERM: save after the current
step, then stop)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Requests:
    def __init__(self) -> None:
        self.checkpoint = False   # write a checkpoint at the end of the current step
        self.stop = 0             # the signal that asked the loop to stop after its current step
        self.announce = True      # the loop says "stopped at step N"; False where a parent says it once

    def request_checkpoint(self, *_args) -> None:
        self.checkpoint = True

    def checkpoint_pending(self) -> bool:
        """True from ``request_checkpoint`` until the loop has saved."""
        return self.checkpoint

    def request_stop(self, signum, _frame=None) -> None:
        """A second signal before the loop has stopped interrupts at once."""
        if self.stop:
            raise KeyboardInterrupt
        self.stop = signum

    @contextlib.contextmanager
    def handlers(self) -> Iterator[None]:
        """SIGUSR1 -> checkpoint, SIGINT/SIGTERM (Ctrl-C, kill, Slurm's cancel) -> stop, for the
        duration of a loop; the previous handlers come back after it (main thread only)."""
        old = {}
        self.stop = 0
        try:
            old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self.request_checkpoint)
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self.request_stop)
        except ValueError:  # not in the main thread
            pass
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            self.stop = 0


@contextlib.contextmanager
def deferred(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """A Ctrl-C (or kill) that arrives inside the block is delivered when it ends: a checkpoint
    being written is finished first. Inside torch.save a KeyboardInterrupt surfaced as torch's
    own RuntimeError from the zip writer's cleanup, with a traceback per process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)   # to the handler in force again: the loop's flag, or KeyboardInterrupt


REQUESTS = Requests()   # the process's one instance (signal handlers are per process)
