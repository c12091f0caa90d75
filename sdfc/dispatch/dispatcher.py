"""The dispatcher: one background worker that moves spooled record events to the writer.

`submit` never blocks for long and never raises: it writes the event to the spool and wakes the worker.
The worker delivers oldest first; on a transient failure it puts the event at the back of the line (so one
bad event cannot hold up the rest) and waits with exponential backoff before the next attempt; on success
the backoff resets. Events only on disk (the in-memory queue was full, or a previous process left them) are
picked up by rescanning the spool whenever the queue runs dry. `close` drains within a deadline; whatever
is left stays in the spool for the next start.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque

from ..records.events import RecordRejected, encode_event
from ..records.outputs import OutputsStore
from .spool import Spool
from .transports import DeliveryRejected

log = logging.getLogger("sdfc.dispatch")


class _MemoryEntry:
    """An event the spool could not take (disk full): delivered from memory, lost only if we die first."""

    def __init__(self, event: dict, image: bytes | None):
        self.event, self.image = event, image


class Dispatcher:
    def __init__(self, spool: Spool, transport, outputs: OutputsStore, queue_size: int = 1000,
                 base_backoff_s: float = 0.2, max_backoff_s: float = 30.0, drain_timeout_s: float = 5.0):
        self.spool, self.transport, self.outputs = spool, transport, outputs
        self.queue_size = queue_size
        self.base_backoff_s, self.max_backoff_s = base_backoff_s, max_backoff_s
        self.drain_timeout_s = drain_timeout_s
        self.delivered = self.retries = self.rejected = 0
        self._start_lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        """Fresh in-memory state: at construction and in a forked child (threads do not survive fork)."""
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._pending: deque = deque()
        self._known: set = set()
        self._rescan = True  # flush what a previous process left in the spool
        self._in_flight = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._closing = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None

    # Producer side ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid != os.getpid():
                self._reset()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sdfc-dispatch", daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def submit(self, event: dict, image: bytes | None = None) -> None:
        try:
            entry = self.spool.write(event, image)
        except OSError:
            log.exception("spool not writable; record %s/%s kept in memory only",
                          event.get("request_id"), event.get("image_index"))
            entry = _MemoryEntry(event, image)
        self.start()
        with self._cond:
            if isinstance(entry, _MemoryEntry) or len(self._pending) < self.queue_size:
                self._pending.append(entry)
                self._known.add(entry)
            else:
                self._rescan = True  # it is on disk; picked up when the queue runs dry
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending (for tests and pre-stop); True when everything was delivered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                busy = self._pending or self._in_flight is not None
            if not busy and not self.spool.names():
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float | None = None) -> bool:
        """Stop after draining for at most `timeout` seconds; True when nothing was left behind."""
        timeout = self.drain_timeout_s if timeout is None else timeout
        thread = self._thread if self._pid == os.getpid() else None
        if thread is None:
            return not self.spool.names()
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        thread.join(timeout + 1.0)
        left = len(self.spool.names())
        if left:
            log.warning("dispatcher stopped with %d record(s) in the spool %s; they are sent at next start",
                        left, self.spool.root)
        return left == 0

    # Worker side -----------------------------------------------------------------------------------------
    def _next_locked(self):
        if not self._pending and self._rescan:
            self._rescan = False
            for name in self.spool.names():
                if name not in self._known:
                    if len(self._pending) >= self.queue_size:
                        self._rescan = True
                        break
                    self._pending.append(name)
                    self._known.add(name)
        return self._pending.popleft() if self._pending else None

    def _run(self) -> None:
        while True:
            try:
                entry = self._take()
                if entry is None:
                    return
                outcome = self._deliver(entry)
            except Exception:  # noqa: BLE001 - the worker must outlive any surprise (a spool read error...)
                log.exception("dispatcher worker error; going on")
                entry, outcome = self._in_flight, "retry"
                if entry is None:
                    time.sleep(self.base_backoff_s)
                    continue
            self._settle(entry, outcome)

    def _take(self):
        """The next entry to deliver, waiting as needed; None when closing is done."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._closing and (now >= self._deadline or (not self._pending and not self._rescan)):
                    return None
                if now < self._retry_at:  # backing off after a failure
                    self._cond.wait(min(self._retry_at, self._deadline) - now)
                    continue
                entry = self._next_locked()
                if entry is not None:
                    self._in_flight = entry
                    return entry
                if self._closing:
                    return None
                self._cond.wait(1.0)

    def _settle(self, entry, outcome: str) -> None:
        with self._cond:
            self._in_flight = None
            if outcome == "retry":
                self._pending.append(entry)  # back of the line
                self._backoff = min(self.max_backoff_s, max(self.base_backoff_s, self._backoff * 2))
                self._retry_at = time.monotonic() + self._backoff
            else:
                self._known.discard(entry)
                self._backoff, self._retry_at = 0.0, 0.0
                if not self._pending:
                    self._rescan = True  # another look for events only on disk

    def _deliver(self, entry) -> str:
        name = entry if isinstance(entry, str) else None
        try:
            event, image = (entry.event, entry.image) if name is None else self.spool.load(name)
        except (OSError, ValueError, KeyError) as exc:
            if name and not self.spool.has(name):
                return "done"  # removed meanwhile (another process flushed it)
            log.error("unreadable spool entry %s: %s", name, exc)
            if name:
                self.spool.reject(name, f"unreadable: {exc}")
            return "rejected"
        try:
            if image is not None:
                # The request's synchronous write to the outputs store had failed: retry it first.
                self.outputs.put(event["image_key"], image)
                if name:
                    self.spool.forget_image(name)
                else:
                    entry.image = None
            body = encode_event(event, self.outputs, self.transport.max_event_bytes)
            self.transport.deliver(body)
        except (RecordRejected, DeliveryRejected) as exc:
            self.rejected += 1
            log.error("record %s/%s refused for good, set aside in %s: %s", event.get("request_id"),
                      event.get("image_index"), self.spool.rejected_dir, exc)
            if name:
                self.spool.reject(name, str(exc))
            return "rejected"
        except Exception as exc:  # noqa: BLE001 - anything else may work later
            self.retries += 1
            log.warning("record %s/%s not delivered yet (%s: %s); retrying with backoff",
                        event.get("request_id"), event.get("image_index"), type(exc).__name__, exc)
            return "retry"
        self.delivered += 1
        if name:
            self.spool.remove(name)
        return "done"
