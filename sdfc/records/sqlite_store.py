"""SQLite: the embedded default (one file under the data dir), same table and columns as MySQL.

One connection per store, used under a lock (the writer, gallery readers and tests share it). WAL mode and a
busy timeout let separate processes (a gallery function, a writer) use one file. A request-path reader waits
for the lock at most `request_timeout`.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from . import schema
from .events import RecordRejected
from .store import WRITE_COLUMNS, RecordStore, StoreUnavailable

class SqliteStore(RecordStore):
    placeholder = "?"

    def __init__(self, path: str, **request_options):
        super().__init__(**request_options)
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    def _open(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(schema.sqlite_create_table())
        have = {r[1] for r in conn.execute(f'PRAGMA table_info("{schema.TABLE}")')}
        for column in schema.ADDED_COLUMNS:
            if column.name not in have:
                conn.execute(schema.sqlite_add_column(column))
        for name, columns, unique in schema.INDEXES:
            conn.execute(schema.sqlite_create_index(name, columns, unique))
        return conn

    @contextmanager
    def cursor(self, request: bool = False):
        if not self._lock.acquire(timeout=self.request_timeout if request else -1):
            raise StoreUnavailable(f"SQLite {self.path}: busy for over {self.request_timeout:g} s")
        try:
            try:
                if self._conn is None:
                    self._conn = self._open()
                cur = self._conn.cursor()
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SQLite {self.path}: {exc}") from exc
            try:
                yield cur
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SQLite {self.path}: {exc}") from exc
            finally:
                cur.close()
        finally:
            self._lock.release()

    def _time_param(self, when: datetime):
        # Text that sorts as time: zero-padded years (strftime writes year 1 as "1"), milliseconds.
        return when.replace(tzinfo=None).isoformat(sep=" ", timespec="milliseconds")

    def _row(self, row: dict) -> dict:
        if isinstance(row.get("created_at"), str):
            row["created_at"] = datetime.fromisoformat(row["created_at"])
        return row

    def upsert(self, row: dict) -> int:
        values = tuple(self._time_param(v) if isinstance(v, datetime) else v for v in (row.get(c) for c in WRITE_COLUMNS))
        cols = ", ".join(f'"{c}"' for c in WRITE_COLUMNS)
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in WRITE_COLUMNS)
        sql = (f'INSERT INTO "{schema.TABLE}" ({cols}) VALUES ({", ".join("?" * len(WRITE_COLUMNS))}) '
               f'ON CONFLICT("request_id", "image_index") DO UPDATE SET {updates}')
        with self.cursor() as cur:
            try:
                cur.execute(sql, values)
            except (sqlite3.IntegrityError, sqlite3.DataError) as exc:
                raise RecordRejected(f"SQLite refused the row: {exc}") from exc
            cur.execute(f'SELECT "id" FROM "{schema.TABLE}" WHERE "request_id" = ? AND "image_index" = ?',
                        (row["request_id"], row["image_index"]))
            return int(cur.fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
