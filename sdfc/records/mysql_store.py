"""MySQL / MariaDB (RDS in FC) through pymysql.

Connections are pooled and reused across invocations (FC keeps the instance, and the module, between calls),
pinged with reconnect before reuse (FC freezes idle instances and MySQL drops idle connections), and never
shared between threads at once (pymysql connections are not thread-safe). Two pools: the writer's, with the
long connect/read/write timeouts of the URL, and the request path's (gallery reads), whose every socket wait is
bounded by `request_timeout`.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import contextmanager

import pymysql
from pymysql.constants import ER

from . import schema
from .events import RecordRejected
from .store import WRITE_COLUMNS, RecordStore, StoreUnavailable

log = logging.getLogger("sdfc.records")

# Server answers that mean "this row can never be stored as it is", as opposed to "try again later".
DATA_ERRORS = {ER.DATA_TOO_LONG, ER.TRUNCATED_WRONG_VALUE_FOR_FIELD, ER.WARN_DATA_OUT_OF_RANGE,
               ER.TRUNCATED_WRONG_VALUE, 1366, ER.NET_PACKET_TOO_LARGE}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_$]{1,64}")
STRICT_MODE = "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@sql_mode, ''), 'STRICT_TRANS_TABLES')"


class _Pool:
    """Idle connections opened with one set of timeouts (the writer's, or the request path's)."""

    def __init__(self, params: dict, size: int):
        self.params, self.size, self.idle = params, size, []


class MySqlStore(RecordStore):
    placeholder = "%s"
    day_sql = "DATE(`created_at`)"
    URL_OPTIONS = ("connect_timeout", "read_timeout", "write_timeout", "pool_size", "request_timeout",
                   "request_slots")

    def __init__(self, host: str, port: int, user: str, password: str, database: str,
                 connect_timeout: float = 5, read_timeout: float = 30, write_timeout: float = 30,
                 pool_size: int = 4, **request_options):
        super().__init__(**request_options)
        if not NAME_PATTERN.fullmatch(database):
            raise ValueError(f"database name {database!r} must be letters, digits, _ or $")
        self.database = database
        self.address = f"{host}:{port}"  # for logs only: never in an HTTP answer
        params = dict(host=host, port=port, user=user, password=password, charset="utf8mb4",
                      autocommit=True, connect_timeout=connect_timeout, read_timeout=read_timeout,
                      write_timeout=write_timeout, init_command=STRICT_MODE)
        short = self.request_timeout
        # The request path's connections: every socket wait (connect, handshake, query, ping) bounded by
        # request_timeout; the writer's keep the long ones (a big image row over a slow link).
        self._pools = {
            False: _Pool(params, pool_size),
            True: _Pool(dict(params, connect_timeout=min(connect_timeout, short), read_timeout=short,
                             write_timeout=short), pool_size),
        }
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self.max_packet = 16 * 1024 * 1024
        self.collation: str | None = None

    # Connections -----------------------------------------------------------------------------------------
    def _connect(self, params: dict):
        try:
            return pymysql.connect(database=self.database, **params)
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] == ER.BAD_DB_ERROR:
                self._create_database(params)
                return pymysql.connect(database=self.database, **params)
            raise

    def _create_database(self, params: dict) -> None:
        conn = pymysql.connect(**params)
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}` CHARACTER SET utf8mb4")
            log.info("created database %s", self.database)
        finally:
            conn.close()

    def _take(self, pool: _Pool):
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours
                for each in self._pools.values():
                    each.idle = []
                self._pid = os.getpid()
            conn = pool.idle.pop() if pool.idle else None
        if conn is not None:
            started = time.monotonic()
            try:
                conn.ping(reconnect=False)  # idle too long, server restarted, instance thawed: reconnect
                return conn
            except (pymysql.err.MySQLError, OSError):
                _close_quietly(conn)
                # A dropped connection fails at once; one that waited out its timeout means the server is not
                # answering, and a reconnect would only wait as long again.
                if time.monotonic() - started >= pool.params["read_timeout"] / 2:
                    raise
        return self._connect(pool.params)

    def _give_back(self, pool: _Pool, conn) -> None:
        with self._lock:
            if len(pool.idle) < pool.size and self._pid == os.getpid():
                pool.idle.append(conn)
                return
        conn.close()

    @contextmanager
    def cursor(self, request: bool = False):
        pool = self._pools[request]
        try:
            conn = self._take(pool)
        except (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError) as exc:
            raise StoreUnavailable(f"MySQL {self.address}: {exc}") from exc
        try:
            self._ensure_schema(conn, wait=self.request_timeout if request else -1)
        except (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError) as exc:
            _close_quietly(conn)
            raise StoreUnavailable(f"MySQL {self.address}: {exc}") from exc
        except BaseException:
            _close_quietly(conn)
            raise
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                yield cur
        except pymysql.err.MySQLError as exc:
            _close_quietly(conn)  # its state is unknown after an error: do not pool it
            code = exc.args[0] if exc.args else None
            if code in DATA_ERRORS or isinstance(exc, (pymysql.err.DataError, pymysql.err.IntegrityError)):
                raise RecordRejected(f"MySQL refused the row: {exc}") from exc
            if isinstance(exc, (pymysql.err.OperationalError, pymysql.err.InterfaceError)):
                raise StoreUnavailable(f"MySQL {self.address}: {exc}") from exc
            raise
        except BaseException:
            _close_quietly(conn)
            raise
        else:
            self._give_back(pool, conn)

    def close(self) -> None:
        with self._lock:
            idle = [conn for pool in self._pools.values() for conn in pool.idle]
            for pool in self._pools.values():
                pool.idle = []
        for conn in idle:
            _close_quietly(conn)

    # Schema ----------------------------------------------------------------------------------------------
    def _ensure_schema(self, conn, wait: float = -1) -> None:
        if self._schema_ready:
            return
        # Another thread (the writer, on a hung database) may hold the lock for its long timeout; a request
        # thread waits at most `wait`.
        if not self._schema_lock.acquire(timeout=wait):
            raise StoreUnavailable(f"MySQL {self.address}: table setup still under way after {wait:g} s")
        try:
            if self._schema_ready:
                return
            with conn.cursor() as cur:
                cur.execute("SELECT @@max_allowed_packet")
                self.max_packet = int(cur.fetchone()[0])
                cur.execute("SHOW COLLATION LIKE 'utf8mb4_0900_ai_ci'")
                # MySQL 8's collation when the server has it; otherwise the server's utf8mb4 default (MariaDB).
                self.collation = "utf8mb4_0900_ai_ci" if cur.fetchall() else None
                cur.execute(schema.mysql_create_table(self.collation))
                cur.execute("SELECT COLUMN_NAME FROM information_schema.COLUMNS "
                            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s", (self.database, schema.TABLE))
                have = {r[0] for r in cur.fetchall()}
                for column in schema.ADDED_COLUMNS:
                    if column.name not in have:
                        _ignore_duplicate(cur, schema.mysql_add_column(column), ER.DUP_FIELDNAME)
                        log.info("added column %s.%s", schema.TABLE, column.name)
                cur.execute("SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS "
                            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s", (self.database, schema.TABLE))
                indexes = {r[0] for r in cur.fetchall()}
                for name, columns, unique in schema.INDEXES:
                    if name not in indexes:
                        _ignore_duplicate(cur, schema.mysql_add_index(name, columns, unique), ER.DUP_KEYNAME)
            self._schema_ready = True
        finally:
            self._schema_lock.release()

    # Writes ----------------------------------------------------------------------------------------------
    def upsert(self, row: dict) -> int:
        values = tuple(row.get(c) for c in WRITE_COLUMNS)
        size = sum(len(v.encode("utf-8")) if isinstance(v, str) else 32 for v in values) + 4096
        if size > self.max_packet:
            raise RecordRejected(f"row of about {size} bytes exceeds the server's max_allowed_packet "
                                 f"({self.max_packet}); raise it to store this image")
        cols = ", ".join(f"`{c}`" for c in WRITE_COLUMNS)
        marks = ", ".join(["%s"] * len(WRITE_COLUMNS))
        updates = ", ".join(f"`{c}` = VALUES(`{c}`)" for c in WRITE_COLUMNS)
        # LAST_INSERT_ID(id) makes a duplicate report the existing row's id.
        sql = (f"INSERT INTO `{schema.TABLE}` ({cols}) VALUES ({marks}) "
               f"ON DUPLICATE KEY UPDATE `id` = LAST_INSERT_ID(`id`), {updates}")
        with self.cursor() as cur:
            cur.execute(sql, values)
            return int(cur.lastrowid)


def _ignore_duplicate(cur, sql: str, code: int) -> None:
    """Run DDL that another writer may have run first (two instances upgrading one table at once)."""
    try:
        cur.execute(sql)
    except pymysql.err.MySQLError as exc:
        if not exc.args or exc.args[0] != code:
            raise


def _close_quietly(conn) -> None:
    try:
        conn.close()
    except Exception:
        pass
