"""The dispatcher: one background worker that moves spooled record events to the writer.

`submit` never blocks for long and never raises: it writes the event to the spool and wakes the worker.
The worker delivers oldest first. An event that failed waits out its own backoff (exponential, per event) and
the failures' shared backoff (one outage is not hammered once per event); an event never tried yet is tried at
once, so an event that keeps failing delays no other. An event that keeps failing while others are delivered
(the writer works, this event does not) is set aside in `rejected/` after `max_strikes` such failures; during an
outage (nothing is delivered) events are retried, never rejected. Events only on disk (the in-memory queue was
full, or a previous process left them) are picked up by rescanning the spool whenever nothing in memory is
ready. `close` drains within a deadline; whatever is left stays in the spool for the next start, and `start`
(or `submit`) after a `close` starts a worker again.
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


class _Failures:
    """What the worker knows of an event that failed: when to try it again, and how often it failed while the
    writer was demonstrably working (deliveries of other events succeeded in between)."""

    def __init__(self, delivered_mark: int):
        self.count = 0
        self.strikes = 0
        self.not_before = 0.0
        self.delivered_mark = delivered_mark  # `delivered` when this event was last tried


class Dispatcher:
    def __init__(self, spool: Spool, transport, outputs: OutputsStore, queue_size: int = 1000,
                 base_backoff_s: float = 0.2, max_backoff_s: float = 30.0, drain_timeout_s: float = 5.0,
                 max_strikes: int = 5):
        self.spool, self.transport, self.outputs = spool, transport, outputs
        self.queue_size = queue_size
        self.base_backoff_s, self.max_backoff_s = base_backoff_s, max_backoff_s
        self.drain_timeout_s = drain_timeout_s
        self.max_strikes = max_strikes
        self.delivered = self.retries = self.rejected = 0
        self._start_lock = threading.Lock()
        self._atexit = False
        self._reset()

    def _reset(self) -> None:
        """Fresh in-memory state: at construction and in a forked child (threads do not survive fork)."""
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._pending: deque = deque()
        self._known: set = set()
        self._failures: dict = {}  # entry -> _Failures, for entries that failed at least once
        self._rescan = True  # flush what a previous process left in the spool
        self._in_flight = None
        self._retry_at = 0.0   # shared backoff after failures: holds back retries, never a first attempt
        self._backoff = 0.0
        self._closing = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None

    # Producer side ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker in this process, again after `close` (a drain in progress is left to finish: what
        is submitted meanwhile is delivered before its deadline, or found in the spool by the next start)."""
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._pid != os.getpid():
                self._reset()
            if self._thread is None or not self._thread.is_alive():
                with self._cond:
                    self._closing, self._deadline, self._rescan = False, float("inf"), True
                self._thread = threading.Thread(target=self._run, name="sdfc-dispatch", daemon=True)
                self._thread.start()
                if not self._atexit:
                    atexit.register(self.close)
                    self._atexit = True

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
                self._rescan = True  # it is on disk; picked up when nothing in memory is ready
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
        if thread is None or not thread.is_alive():
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
    def _rescan_locked(self) -> None:
        self._rescan = False
        try:
            if adopted := self.spool.adopt_orphans():
                log.info("adopted %d record(s) a recycled instance left in the shared spool", adopted)
        except OSError:
            log.exception("could not look for other instances' records in the spool; going on with ours")
        for name in self.spool.names():
            if name not in self._known:
                if len(self._pending) >= self.queue_size:
                    self._rescan = True
                    break
                self._pending.append(name)
                self._known.add(name)

    def _ready_locked(self, now: float):
        """(the oldest entry due now, or None; when the next one falls due)."""
        wake = float("inf")
        for attempt in range(2):
            for entry in self._pending:
                failures = self._failures.get(entry)
                due = 0.0 if failures is None else max(failures.not_before, self._retry_at)
                if due <= now:
                    self._pending.remove(entry)
                    return entry, now
                wake = min(wake, due)
            if attempt == 0 and self._rescan:
                self._rescan_locked()  # nothing in memory is due: look for events only on disk
            else:
                break
        return None, wake

    def _run(self) -> None:
        while True:
            try:
                entry = self._take()
                if entry is None:
                    return
                outcome, reason = self._deliver(entry)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any surprise (a spool read error...)
                log.exception("dispatcher worker error; going on")
                entry, outcome, reason = self._in_flight, "retry", f"{type(exc).__name__}: {exc}"
                if entry is None:
                    time.sleep(self.base_backoff_s)
                    continue
            attempts = self._settle(entry, outcome)
            if attempts:
                self._set_aside(entry, f"not delivered in {attempts} attempts, the last {self.max_strikes} while "
                                       f"other records were; last error: {reason}")

    def _take(self):
        """The next entry to deliver, waiting as needed; None when closing is done."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._closing and (now >= self._deadline or (not self._pending and not self._rescan)):
                    return None
                entry, wake = self._ready_locked(now)
                if entry is not None:
                    self._in_flight = entry
                    return entry
                if self._closing and not self._pending and not self._rescan:
                    return None
                self._cond.wait(max(0.0, min(wake, self._deadline, now + 1.0) - now))

    def _settle(self, entry, outcome: str) -> int:
        """Book the outcome; the number of attempts when the entry failed for the last time and must be set
        aside, else 0."""
        with self._cond:
            self._in_flight = None
            if outcome != "retry":
                self._known.discard(entry)
                self._failures.pop(entry, None)
                if outcome == "done":
                    self._backoff, self._retry_at = 0.0, 0.0
                if not self._pending:
                    self._rescan = True  # another look for events only on disk
                return 0
            failures = self._failures.get(entry)
            if failures is None:
                failures = self._failures[entry] = _Failures(self.delivered)
            elif self.delivered > failures.delivered_mark:
                failures.strikes += 1  # others got through since its last try: this event is the problem
            failures.count += 1
            failures.delivered_mark = self.delivered
            if failures.strikes >= self.max_strikes:
                self._known.discard(entry)
                del self._failures[entry]
                return failures.count
            # Its own backoff grows with the failures that were its own; an outage is paced by the shared one.
            now = time.monotonic()
            failures.not_before = now + min(self.max_backoff_s, self.base_backoff_s * 2 ** failures.strikes)
            self._backoff = min(self.max_backoff_s, max(self.base_backoff_s, self._backoff * 2))
            self._retry_at = now + self._backoff
            self._pending.append(entry)  # back of the line
            return 0

    def _set_aside(self, entry, reason: str) -> None:
        self.rejected += 1
        name = entry if isinstance(entry, str) else None
        log.error("record %s set aside in %s: %s", name or "(in memory)", self.spool.rejected_dir, reason)
        if name:
            self.spool.reject(name, reason)

    def _deliver(self, entry) -> tuple[str, str]:
        """("done" | "rejected" | "retry", the reason for the last two)."""
        name = entry if isinstance(entry, str) else None
        try:
            event, image = (entry.event, entry.image) if name is None else self.spool.load(name)
        except (OSError, ValueError, KeyError) as exc:
            if name and not self.spool.has(name):
                return "done", ""  # removed meanwhile (another process flushed it)
            log.error("unreadable spool entry %s: %s", name, exc)
            if name:
                self.spool.reject(name, f"unreadable: {exc}")
            return "rejected", str(exc)
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
            return "rejected", str(exc)
        except Exception as exc:  # noqa: BLE001 - anything else may work later
            self.retries += 1
            log.warning("record %s/%s not delivered yet (%s: %s); retrying with backoff",
                        event.get("request_id"), event.get("image_index"), type(exc).__name__, exc)
            return "retry", f"{type(exc).__name__}: {exc}"
        self.delivered += 1
        if name:
            self.spool.remove(name)
        return "done", ""
