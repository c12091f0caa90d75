"""The local worker: one thread per process that takes queued tasks from the store, oldest first.

Any process sharing the database may take any task (that is how a second local server helps), and every pass
also reaps tasks whose instance died, so none stays `running` forever. Generation itself still goes through
the API's FIFO lock, so tasks and v1 requests share the engine in arrival order.
"""
from __future__ import annotations

import logging
import os
import threading

from .runner import TaskRunner
from .store import TaskStore

log = logging.getLogger("sdfc.jobs")


class LocalWorker:
    def __init__(self, store: TaskStore, runner: TaskRunner, poll_s: float = 1.0):
        self.store, self.runner, self.poll_s = store, runner, poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = None
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Start in the serving process (idempotent; a forked child starts its own)."""
        with self._start_lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._stop.clear()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="sdfc-task-worker", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 0.0) -> None:
        """Take no new task; wait up to `timeout` for the one running."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and timeout:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set() and not self.runner.api.draining:  # a draining instance takes no more
            try:
                self.store.reap()
                task = self.store.claim_next(self.runner.instance, self.runner.lease_s)
            except Exception:  # noqa: BLE001 - the database may be away; try again at the next poll
                log.warning("task worker: store unavailable", exc_info=True)
                task = None
            if task is not None:
                self.runner.run(task)
                continue
            self._wake.wait(self.poll_s)
            self._wake.clear()
