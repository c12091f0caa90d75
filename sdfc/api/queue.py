"""One generation at a time per engine, served in arrival order (A1111's queue_lock, made FIFO)."""
from __future__ import annotations

import threading

from .errors import ApiError


class QueueClosed(ApiError):
    """The server is shutting down and its drain ran out of time: a job still waiting is refused (503)."""

    def __init__(self):
        super().__init__(503, "the server is shutting down and this job had not started; send it again",
                         error="ServiceUnavailable")


class FifoLock:
    """A lock that is granted in the order it was asked for (threading.Lock promises no order).

    `close()` turns every waiter away (QueueClosed) and every later caller too; the holder keeps the lock."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()  # tickets whose waiter left: skipped when their turn comes
        self._closed = False

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._next_ticket - self._serving - len(self._abandoned)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __enter__(self):
        with self._cond:
            if self._closed:
                raise QueueClosed()
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                if self._closed:
                    self._abandoned.add(ticket)
                    raise QueueClosed()
                self._cond.wait()
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            while self._serving in self._abandoned:
                self._abandoned.discard(self._serving)
                self._serving += 1
            self._cond.notify_all()
        return False
