"""One interface over the record stores (MySQL/MariaDB and SQLite), chosen by `SDFC_DATABASE_URL`.

Subclasses provide a connection and their placeholder; the SQL here is shared. Every value reaches the
database as a query parameter, never inside the SQL text.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qs, unquote, urlsplit

from .schema import ALL_COLUMNS, TABLE

WRITE_COLUMNS = tuple(c.name for c in ALL_COLUMNS)
LIST_COLUMNS = ("id",) + tuple(c for c in WRITE_COLUMNS if c != "image_base64")


class StoreUnavailable(RuntimeError):
    """The database cannot be reached right now: transient, retried by the dispatcher."""


@dataclass
class GalleryQuery:
    text: str | None = None        # substring of the prompt
    model: str | None = None       # exact model name
    since: datetime | None = None  # created_at >= since (naive UTC)
    until: datetime | None = None  # created_at < until
    page: int = 1
    page_size: int = 20


def like_pattern(text: str) -> str:
    """`text` as a LIKE substring pattern, with '!' escaping the wildcards (see `ESCAPE '!'`)."""
    return "%" + text.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


class RecordStore(ABC):
    placeholder = "?"

    @abstractmethod
    def upsert(self, row: dict) -> int:
        """Insert the row, or update the one with the same (request_id, image_index); returns its id."""

    @abstractmethod
    def cursor(self):
        """A cursor on a live connection, schema ensured; raises StoreUnavailable when none can be had."""

    def close(self) -> None:
        pass

    # Reads, shared by both backends.
    def _fetch(self, sql: str, params: tuple = ()) -> list[dict]:
        with self.cursor() as cur:
            cur.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [self._row(dict(zip(names, r))) if not isinstance(r, dict) else self._row(r)
                    for r in cur.fetchall()]

    def _row(self, row: dict) -> dict:
        return row

    def get(self, record_id: int, with_image: bool = False) -> dict | None:
        columns = LIST_COLUMNS + (("image_base64",) if with_image else ())
        rows = self._fetch(f"SELECT {', '.join(f'`{c}`' for c in columns)} FROM `{TABLE}` WHERE `id` = "
                           f"{self.placeholder}", (int(record_id),))
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
        if q.since:
            clauses.append(f"`created_at` >= {p}")
            params.append(self._time_param(q.since))
        if q.until:
            clauses.append(f"`created_at` < {p}")
            params.append(self._time_param(q.until))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _time_param(self, when: datetime):
        return when

    def query(self, q: GalleryQuery) -> tuple[list[dict], int]:
        """One page, newest first (by generation time, then insertion), and the total matching."""
        where, params = self._where(q)
        total = self._fetch(f"SELECT COUNT(*) AS n FROM `{TABLE}`{where}", tuple(params))[0]["n"]
        p = self.placeholder
        rows = self._fetch(
            f"SELECT {', '.join(f'`{c}`' for c in LIST_COLUMNS)} FROM `{TABLE}`{where} "
            f"ORDER BY `created_at` DESC, `id` DESC LIMIT {p} OFFSET {p}",
            tuple(params) + (q.page_size, (q.page - 1) * q.page_size))
        return rows, int(total)

    def models(self) -> list[str]:
        rows = self._fetch(f"SELECT DISTINCT `model` FROM `{TABLE}` WHERE `model` IS NOT NULL ORDER BY `model`")
        return [r["model"] for r in rows]

    def count(self) -> int:
        return int(self._fetch(f"SELECT COUNT(*) AS n FROM `{TABLE}`")[0]["n"])


def open_store(url: str) -> RecordStore:
    """`sqlite:///relative.db`, `sqlite:////absolute.db`, or `mysql://user:pass@host:3306/db?connect_timeout=5`."""
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
