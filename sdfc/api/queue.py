"""One generation at a time per engine, served in arrival order (A1111's queue_lock, made FIFO)."""
from __future__ import annotations

import threading


class FifoLock:
    """A lock that is granted in the order it was asked for (threading.Lock promises no order)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._next_ticket - self._serving

    def __enter__(self):
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()
        return False
