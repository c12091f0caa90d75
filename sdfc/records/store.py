"""One interface over the record stores (MySQL/MariaDB and SQLite), chosen by `SDFC_DATABASE_URL`.

Subclasses provide a connection and their placeholder; the SQL here is shared. Every value reaches the
database as a query parameter, never inside the SQL text.

Reads made for an HTTP request (`request=True`: the gallery) go through a `RequestGate` and a cursor with short
timeouts, so that a slow or hung database costs a request thread a few seconds at most and never all of them;
the records writer (the dispatcher's background thread) keeps the long timeouts.
"""
from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qs, unquote, urlsplit

from .schema import ALL_COLUMNS, TABLE

WRITE_COLUMNS = tuple(c.name for c in ALL_COLUMNS)
LIST_COLUMNS = ("id",) + tuple(c for c in WRITE_COLUMNS if c != "image_base64")


# The largest id either backend can hold (SQLite's INTEGER; MySQL's `int` is smaller): beyond it no row exists,
# and SQLite refuses to even bind the number.
MAX_RECORD_ID = 2**63 - 1
REQUEST_TIMEOUT_S = 5.0  # a request-path read waits at most this long on the database
REQUEST_SLOTS = 2        # request threads that may wait on the database at once (the server has few)
SLOT_WAIT_S = 0.25       # how long a request waits for a free slot before answering 503


class StoreUnavailable(RuntimeError):
    """The database cannot be reached right now: transient, retried by the dispatcher.

    `retry_after` (seconds), when set, is how soon a request-path caller should try again."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestGate:
    """Bounds what request threads spend on the database.

    At most `slots` of them wait on it at once; another waits `slot_wait_s` for a slot, then gives up (503).
    After a request-path failure (a timeout, a refused connection) the gate stays shut for `cooldown_s`:
    requests fail at once instead of each waiting out the timeout again on a database known to be down.
    """

    def __init__(self, slots: int = REQUEST_SLOTS, slot_wait_s: float = SLOT_WAIT_S,
                 cooldown_s: float = REQUEST_TIMEOUT_S, clock=time.monotonic):
        if slots < 1:
            raise ValueError(f"request_slots must be at least 1, got {slots}")
        self.slots = slots
        self._slots = threading.BoundedSemaphore(slots)
        self.slot_wait_s, self.cooldown_s, self._clock = slot_wait_s, cooldown_s, clock
        self._shut_until = 0.0

    def _retry_after(self) -> int:
        return max(1, math.ceil(max(self._shut_until - self._clock(), self.cooldown_s)))

    @contextmanager
    def enter(self):
        if self._clock() < self._shut_until:
            raise StoreUnavailable("the database failed a moment ago", retry_after=self._retry_after())
        if not self._slots.acquire(timeout=self.slot_wait_s):
            raise StoreUnavailable(f"{self.slots} request(s) already waiting on the database",
                                   retry_after=self._retry_after())
        try:
            yield
        except StoreUnavailable as exc:
            self._shut_until = max(self._shut_until, self._clock() + self.cooldown_s)
            if exc.retry_after is None:
                exc.retry_after = self._retry_after()
            raise
        finally:
            self._slots.release()


@dataclass
class GalleryQuery:
    text: str | None = None        # substring of the prompt
    model: str | None = None       # exact model name
    since: datetime | None = None  # created_at >= since (naive UTC)
    until: datetime | None = None  # created_at < until
    user: str | None = None        # exact user name (None: every user's)
    page: int = 1
    page_size: int = 20


def like_pattern(text: str) -> str:
    """`text` as a LIKE substring pattern, with '!' escaping the wildcards (see `ESCAPE '!'`)."""
    return "%" + text.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


class RecordStore(ABC):
    placeholder = "?"
    day_sql = "substr(`created_at`, 1, 10)"  # the UTC date of created_at as YYYY-MM-DD (SQLite keeps text)

    def __init__(self, request_timeout: float = REQUEST_TIMEOUT_S, request_slots: int = REQUEST_SLOTS):
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be a positive number of seconds, got {request_timeout}")
        self.request_timeout = float(request_timeout)
        self.gate = RequestGate(request_slots, slot_wait_s=min(SLOT_WAIT_S, self.request_timeout),
                                cooldown_s=self.request_timeout)

    @abstractmethod
    def upsert(self, row: dict) -> int:
        """Insert the row, or update the one with the same (request_id, image_index); returns its id."""

    @abstractmethod
    def cursor(self, request: bool = False):
        """A cursor on a live connection, schema ensured; raises StoreUnavailable when none can be had.

        `request=True`: for a request thread, every wait (connection, lock, query) bounded by
        `request_timeout`."""

    def close(self) -> None:
        pass

    def request_cursor(self):
        """A cursor for code answering an HTTP request: through the gate, every wait bounded by
        request_timeout; raises StoreUnavailable (with `retry_after`) instead of holding the thread."""
        return self._reading(True)

    @contextmanager
    def _reading(self, request: bool):
        if not request:
            with self.cursor() as cur:
                yield cur
            return
        with self.gate.enter(), self.cursor(request=True) as cur:
            yield cur

    # Reads, shared by both backends. `request=True` for reads that answer an HTTP request.
    def _rows(self, cur, sql: str, params: tuple = ()) -> list[dict]:
        cur.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [self._row(dict(zip(names, r))) if not isinstance(r, dict) else self._row(r)
                for r in cur.fetchall()]

    def _fetch(self, sql: str, params: tuple = (), request: bool = False) -> list[dict]:
        with self._reading(request) as cur:
            return self._rows(cur, sql, params)

    def _row(self, row: dict) -> dict:
        return row

    def get(self, record_id: int, with_image: bool = False, request: bool = False) -> dict | None:
        record_id = int(record_id)
        if not 1 <= record_id <= MAX_RECORD_ID:
            return None  # no such row can exist (ids start at 1), and SQLite cannot bind beyond 2^63
        columns = LIST_COLUMNS + (("image_base64",) if with_image else ())
        rows = self._fetch(f"SELECT {', '.join(f'`{c}`' for c in columns)} FROM `{TABLE}` WHERE `id` = "
                           f"{self.placeholder}", (record_id,), request=request)
        return rows[0] if rows else None

    def find(self, request_id: str, image_index: int) -> dict | None:
        p = self.placeholder
        rows = self._fetch(f"SELECT `id` FROM `{TABLE}` WHERE `request_id` = {p} AND `image_index` = {p}",
                           (request_id, image_index))
        return self.get(rows[0]["id"], with_image=True) if rows else None

    def _where(self, q: GalleryQuery) -> tuple[str, list]:
        p, clauses, params = self.placeholder, [], []
        if q.text:
            clauses.append(f"`prompt` LIKE {p} ESCAPE '!'")
            params.append(like_pattern(q.text))
        if q.model:
            clauses.append(f"`model` = {p}")
            params.append(q.model)
        if q.user is not None:
            clauses.append(f"`user` = {p}")
            params.append(q.user)
        if q.since:
            clauses.append(f"`created_at` >= {p}")
            params.append(self._time_param(q.since))
        if q.until:
            clauses.append(f"`created_at` < {p}")
            params.append(self._time_param(q.until))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _time_param(self, when: datetime):
        return when

    def query(self, q: GalleryQuery, request: bool = False) -> tuple[list[dict], int]:
        """One page, newest first (by generation time, then insertion), and the total matching."""
        where, params = self._where(q)
        p = self.placeholder
        with self._reading(request) as cur:  # one connection (and one gate slot) for both statements
            total = self._rows(cur, f"SELECT COUNT(*) AS n FROM `{TABLE}`{where}", tuple(params))[0]["n"]
            rows = self._rows(
                cur, f"SELECT {', '.join(f'`{c}`' for c in LIST_COLUMNS)} FROM `{TABLE}`{where} "
                     f"ORDER BY `created_at` DESC, `id` DESC LIMIT {p} OFFSET {p}",
                tuple(params) + (q.page_size, (q.page - 1) * q.page_size))
        return rows, int(total)

    def models(self, request: bool = False, user: str | None = None) -> list[str]:
        where, params = self._where(GalleryQuery(user=user))
        where = (where + " AND" if where else " WHERE") + " `model` IS NOT NULL"
        rows = self._fetch(f"SELECT DISTINCT `model` FROM `{TABLE}`{where} ORDER BY `model`", tuple(params),
                           request=request)
        return [r["model"] for r in rows]

    def usage(self, q: GalleryQuery, request: bool = False) -> dict:
        """Images, gpu_seconds and cost of the rows matching `q` (its page ignored): in total and grouped per
        UTC day, per model and per user, each group sorted by its key (NULL first: legacy rows)."""
        where, params = self._where(q)
        sums = "COUNT(*) AS images, SUM(`gpu_seconds`) AS gpu_seconds, SUM(`cost`) AS cost"
        groups = {"by_day": ("day", self.day_sql), "by_model": ("model", "`model`"), "by_user": ("user", "`user`")}
        with self._reading(request) as cur:  # one connection (and one gate slot) for all four
            result = {"total": _sums(self._rows(cur, f"SELECT {sums} FROM `{TABLE}`{where}", tuple(params))[0])}
            for name, (key, expr) in groups.items():
                rows = self._rows(cur, f"SELECT {expr} AS `key`, {sums} FROM `{TABLE}`{where} "
                                       f"GROUP BY {expr} ORDER BY {expr}", tuple(params))
                result[name] = [{key: _key(r["key"]), **_sums(r)} for r in rows]
        return result

    def count(self) -> int:
        return int(self._fetch(f"SELECT COUNT(*) AS n FROM `{TABLE}`")[0]["n"])


def _sums(row: dict) -> dict:
    # SUM over no rows, or over NULLs only (rows from before costs were recorded), is NULL: nothing spent.
    return {"images": int(row["images"] or 0), "gpu_seconds": float(row["gpu_seconds"] or 0.0),
            "cost": float(row["cost"] or 0.0)}


def _key(value):
    return value.isoformat() if hasattr(value, "isoformat") else value  # MySQL's DATE() is a date


def open_store(url: str) -> RecordStore:
    """`sqlite:///relative.db`, `sqlite:////absolute.db`, or `mysql://user:pass@host:3306/db?connect_timeout=5`.

    MySQL options in the query: connect_timeout, read_timeout, write_timeout (the writer's, seconds),
    pool_size, request_timeout (every wait of a request-path read, seconds) and request_slots (request
    threads that may wait on the database at once)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from .sqlite_store import SqliteStore
        if not url.startswith("sqlite:///"):
            raise ValueError(f"SDFC_DATABASE_URL {url!r}: write sqlite:///relative/path or sqlite:////absolute/path")
        return SqliteStore(unquote(url[len("sqlite:///"):]))
    if scheme in ("mysql", "mysql+pymysql", "mariadb"):
        from .mysql_store import MySqlStore
        parts = urlsplit(url)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        database = unquote(parts.path.lstrip("/")) or "stable_diffusion"
        return MySqlStore(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                          user=unquote(parts.username or "root"), password=unquote(parts.password or ""),
                          database=database, **{k: float(v) if "timeout" in k else int(v)
                                                for k, v in options.items()
                                                if k in MySqlStore.URL_OPTIONS})
    raise ValueError(f"SDFC_DATABASE_URL {url!r}: unknown scheme {scheme!r} (use sqlite:/// or mysql://)")
