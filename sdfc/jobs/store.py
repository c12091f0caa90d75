"""The task store: `generation_tasks` rows read and written through the records database's connection.

Every state change is one conditional UPDATE (`... WHERE status = 'queued'`), so that two instances racing for
the same task cannot both win: the one whose UPDATE changed a row owns it. Nothing here knows HTTP or the engine.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass

from ..records.events import RecordRejected
from ..records.store import RecordStore
from . import schema
from .schema import TABLE

# A task whose instance stopped heartbeating before its first sampling step is run again this many times in all.
MAX_ATTEMPTS = 2


@dataclass
class TaskPage:
    rows: list[dict]
    total: int


class TaskStore:
    """`for_requests`: the view HTTP handlers use, every database wait bounded as the gallery's are (a hung
    database answers 503 instead of holding a request thread); the worker's view waits like the writer."""

    def __init__(self, records: RecordStore, for_requests: bool = False):
        self.records = records
        self.for_requests = for_requests
        self.p = records.placeholder
        self._mysql = self.p == "%s"
        self._ready = False
        self._ready_lock = threading.Lock()

    # Plumbing ---------------------------------------------------------------------------------------------
    def _ensure(self, cur) -> None:
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            if self._mysql:
                cur.execute("SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                            "AND TABLE_NAME = %s", (TABLE,))
                have = {r["COLUMN_NAME"] if isinstance(r, dict) else r[0] for r in cur.fetchall()}
                cur.execute("SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS WHERE "
                            "TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s", (TABLE,))
                indexes = {r["INDEX_NAME"] if isinstance(r, dict) else r[0] for r in cur.fetchall()}
                statements = schema.mysql_statements(have or None, indexes)
            else:
                cur.execute(f'PRAGMA table_info("{TABLE}")')
                have = {r[1] for r in cur.fetchall()}
                statements = schema.sqlite_statements(have or None)
            for sql in statements:
                cur.execute(sql)
            self._ready = True

    def _cursor(self):
        return self.records.request_cursor() if self.for_requests else self.records.cursor()

    def _run(self, sql: str, params: tuple = ()) -> int:
        """One write; the number of rows it changed."""
        with self._cursor() as cur:
            self._ensure(cur)
            cur.execute(sql, params)
            return cur.rowcount

    def _fetch(self, sql: str, params: tuple = ()) -> list[dict]:
        with self._cursor() as cur:
            self._ensure(cur)
            cur.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [r if isinstance(r, dict) else dict(zip(names, r)) for r in cur.fetchall()]

    def _columns(self) -> str:
        return ", ".join(f"`{c}`" for c in ("id",) + schema.COLUMN_NAMES)

    # Submit and read ---------------------------------------------------------------------------------------
    def create(self, task_id: str, task_type: str, user: str, payload_key: str,
               idempotency_key: str | None = None, now: float | None = None) -> tuple[dict, bool]:
        """Insert a queued task; (the row, True). With an idempotency key already used by this user: (that
        task, False). The same id twice (a client's force_task_id reused) is a RecordRejected."""
        now = time.time() if now is None else now
        p = self.p
        try:  # the unique (user, idempotency_key) index decides: no read-then-write race
            self._run(f"INSERT INTO `{TABLE}` (`id`, `type`, `user`, `status`, `idempotency_key`, `payload_key`, "
                      f"`step`, `steps`, `progress`, `created_at`, `attempts`, `cancel_requested`) "
                      f"VALUES ({p}, {p}, {p}, 'queued', {p}, {p}, 0, 0, 0, {p}, 0, 0)",
                      (task_id, task_type, user, idempotency_key, payload_key, now))
        except (RecordRejected, sqlite3.IntegrityError) as exc:
            existing = self.find_idempotent(user, idempotency_key) if idempotency_key else None
            if existing:  # an earlier (or concurrent) submit with the same key made the task
                return existing, False
            raise RecordRejected(f"task id {task_id!r} is taken") from exc
        return self.get(task_id), True

    def find_idempotent(self, user: str, key: str) -> dict | None:
        rows = self._fetch(f"SELECT {self._columns()} FROM `{TABLE}` WHERE `user` = {self.p} AND "
                           f"`idempotency_key` = {self.p}", (user, key))
        return rows[0] if rows else None

    def get(self, task_id: str) -> dict | None:
        rows = self._fetch(f"SELECT {self._columns()} FROM `{TABLE}` WHERE `id` = {self.p}", (task_id,))
        return rows[0] if rows else None

    def list(self, user: str | None, status: str | None, page: int, page_size: int) -> TaskPage:
        """Newest first; `user` None means every user's (an admin)."""
        clauses, params = [], []
        if user is not None:
            clauses.append(f"`user` = {self.p}")
            params.append(user)
        if status:
            clauses.append(f"`status` = {self.p}")
            params.append(status)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        total = self._fetch(f"SELECT COUNT(*) AS n FROM `{TABLE}`{where}", tuple(params))[0]["n"]
        rows = self._fetch(f"SELECT {self._columns()} FROM `{TABLE}`{where} ORDER BY `created_at` DESC, `id` DESC "
                           f"LIMIT {self.p} OFFSET {self.p}", tuple(params) + (page_size, (page - 1) * page_size))
        return TaskPage(rows, int(total))

    def pending_ids(self, user: str | None = None, limit: int = 1000) -> list[str]:
        """Queued tasks, oldest first (A1111's pending tasks: not the running one); `user` None: everyone's."""
        where, params = ("", ()) if user is None else (f" AND `user` = {self.p}", (user,))
        rows = self._fetch(f"SELECT `id` FROM `{TABLE}` WHERE `status` = 'queued'{where} "
                           f"ORDER BY `created_at`, `id` LIMIT {self.p}", params + (limit,))
        return [r["id"] for r in rows]

    def queue_position(self, task: dict) -> int:
        """How many queued tasks were submitted before this one."""
        rows = self._fetch(f"SELECT COUNT(*) AS n FROM `{TABLE}` WHERE `status` = 'queued' AND `created_at` < {self.p}",
                           (task["created_at"],))
        return int(rows[0]["n"])

    # Execution ---------------------------------------------------------------------------------------------
    def claim(self, task_id: str, instance: str, lease_s: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        p = self.p
        return self._run(f"UPDATE `{TABLE}` SET `status` = 'running', `instance` = {p}, `started_at` = {p}, "
                         f"`heartbeat_at` = {p}, `lease_until` = {p}, `attempts` = `attempts` + 1 "
                         f"WHERE `id` = {p} AND `status` = 'queued'",
                         (instance, now, now, now + lease_s, task_id)) == 1

    def claim_next(self, instance: str, lease_s: float) -> dict | None:
        """The oldest queued task, now running here; None when there is none (or others took them all)."""
        for _ in range(5):
            rows = self._fetch(f"SELECT `id` FROM `{TABLE}` WHERE `status` = 'queued' "
                               "ORDER BY `created_at`, `id` LIMIT 1")
            if not rows:
                return None
            if self.claim(rows[0]["id"], instance, lease_s):
                return self.get(rows[0]["id"])
        return None

    def heartbeat(self, task_id: str, instance: str, lease_s: float, step: int, steps: int, progress: float,
                  eta: float | None, preview_key: str | None = None, now: float | None = None,
                  loss: float | None = None) -> bool:
        """Record progress and extend the lease; True when someone asked to cancel the task."""
        now = time.time() if now is None else now
        p = self.p
        self._run(f"UPDATE `{TABLE}` SET `step` = {p}, `steps` = {p}, `progress` = {p}, `eta` = {p}, "
                  f"`preview_key` = COALESCE({p}, `preview_key`), `loss` = COALESCE({p}, `loss`), "
                  f"`heartbeat_at` = {p}, `lease_until` = {p} "
                  f"WHERE `id` = {p} AND `status` = 'running' AND `instance` = {p}",
                  (step, steps, progress, eta, preview_key, loss, now, now + lease_s, task_id, instance))
        return self.cancel_requested(task_id)

    def cancel_requested(self, task_id: str) -> bool:
        rows = self._fetch(f"SELECT `cancel_requested` FROM `{TABLE}` WHERE `id` = {self.p}", (task_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def finish(self, task_id: str, instance: str, status: str, result_key: str | None = None,
               error: str | None = None, gpu_seconds: float | None = None, cost: float | None = None,
               step: int | None = None, steps: int | None = None, now: float | None = None,
               loss: float | None = None) -> bool:
        """The final state, from the instance that ran it (`step`: the last one sampled, when known)."""
        assert status in schema.FINISHED
        now = time.time() if now is None else now
        p = self.p
        return self._run(f"UPDATE `{TABLE}` SET `status` = {p}, `result_key` = {p}, `error` = {p}, "
                         f"`gpu_seconds` = {p}, `cost` = {p}, `finished_at` = {p}, `lease_until` = NULL, "
                         f"`step` = COALESCE({p}, `step`), `steps` = COALESCE({p}, `steps`), "
                         f"`loss` = COALESCE({p}, `loss`), "
                         f"`progress` = CASE WHEN {p} = 'succeeded' THEN 1 ELSE `progress` END "
                         f"WHERE `id` = {p} AND `status` = 'running' AND `instance` = {p}",
                         (status, result_key, error, gpu_seconds, cost, now, step, steps, loss, status, task_id,
                          instance)) == 1

    def release(self, task_id: str, instance: str) -> bool:
        """Give a task that never started back to the queue (this instance is shutting down)."""
        p = self.p
        return self._run(f"UPDATE `{TABLE}` SET `status` = 'queued', `instance` = NULL, `lease_until` = NULL, "
                         f"`started_at` = NULL, `attempts` = `attempts` - 1 "
                         f"WHERE `id` = {p} AND `status` = 'running' AND `instance` = {p}", (task_id, instance)) == 1

    def abandon(self, task_id: str, error: str, now: float | None = None) -> bool:
        """A queued task nothing will run (its hand-off failed): failed, with why."""
        now = time.time() if now is None else now
        p = self.p
        return self._run(f"UPDATE `{TABLE}` SET `status` = 'failed', `error` = {p}, `finished_at` = {p} "
                         f"WHERE `id` = {p} AND `status` = 'queued'", (error, now, task_id)) == 1

    def cancel(self, task_id: str, now: float | None = None) -> str | None:
        """Cancel a queued task at once, flag a running one for its instance; the status afterwards."""
        now = time.time() if now is None else now
        p = self.p
        self._run(f"UPDATE `{TABLE}` SET `status` = 'cancelled', `finished_at` = {p}, `cancel_requested` = 1 "
                  f"WHERE `id` = {p} AND `status` = 'queued'", (now, task_id))
        self._run(f"UPDATE `{TABLE}` SET `cancel_requested` = 1 WHERE `id` = {p} AND `status` = 'running'",
                  (task_id,))
        task = self.get(task_id)
        return task["status"] if task else None

    def reap(self, now: float | None = None) -> list[str]:
        """Tasks whose instance stopped heartbeating: run again if sampling never started, else failed."""
        now = time.time() if now is None else now
        p = self.p
        expired = self._fetch(f"SELECT `id`, `instance`, `step`, `attempts`, `lease_until` FROM `{TABLE}` "
                              f"WHERE `status` = 'running' AND `lease_until` < {p}", (now,))
        for task in expired:
            if not task["step"] and (task["attempts"] or 0) < MAX_ATTEMPTS:
                self._run(f"UPDATE `{TABLE}` SET `status` = 'queued', `instance` = NULL, `lease_until` = NULL, "
                          f"`started_at` = NULL WHERE `id` = {p} AND `status` = 'running' AND `lease_until` < {p}",
                          (task["id"], now))
            else:
                error = (f"the instance running this task ({task['instance']}) stopped answering: its lease "
                         f"expired at step {task['step'] or 0} (attempt {task['attempts']})")
                self._run(f"UPDATE `{TABLE}` SET `status` = 'failed', `error` = {p}, `finished_at` = {p}, "
                          f"`lease_until` = NULL WHERE `id` = {p} AND `status` = 'running' AND `lease_until` < {p}",
                          (error, now, task["id"], now))
        return [t["id"] for t in expired]
