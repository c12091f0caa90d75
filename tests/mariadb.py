"""Real MariaDB for the records tests: a throwaway database on the shared server (127.0.0.1:3306, started by
.ci/run), and a private mariadbd instance that a test may stop and restart without touching the shared one."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pymysql
import pytest

from .live_server import free_port

SHARED = dict(host="127.0.0.1", port=3306, user="root", password="")


def connect(database: str | None = None, **server):
    params = {**SHARED, **server}
    return pymysql.connect(database=database, charset="utf8mb4", autocommit=True, connect_timeout=3, **params)


def url(database: str, port: int = 3306) -> str:
    return f"mysql://root@127.0.0.1:{port}/{database}?connect_timeout=2"


@contextmanager
def temp_database(prefix: str = "sdfc_test"):
    """A fresh database `sdfc_test_<random>` on the shared server, dropped afterwards."""
    try:
        conn = connect()
    except pymysql.err.OperationalError as exc:
        pytest.fail(f"MariaDB is not reachable on 127.0.0.1:3306 ({exc}); `.ci/run` starts it")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def fetch(database: str, sql: str, params: tuple = (), port: int = 3306) -> list[dict]:
    conn = connect(database, port=port)
    try:
        with conn.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def _binary(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                       None)
    if not found:
        pytest.fail(f"{name} not found: install mariadb-server (`.ci/run` does)")
    return found


class PrivateMariaDB:
    """Its own datadir, port and socket in a temporary folder; stop() and start() at will."""

    def __init__(self, root: Path):
        self.root = root
        self.datadir = root / "datadir"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._user = ["--user=root"] if os.geteuid() == 0 else []

    def install(self) -> "PrivateMariaDB":
        subprocess.run([_binary("mariadb-install-db"), "--no-defaults", f"--datadir={self.datadir}",
                        "--auth-root-authentication-method=normal", "--skip-test-db", *self._user],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def start(self, timeout: float = 30) -> None:
        log = open(self.root / "mariadbd.log", "a")
        self.process = subprocess.Popen(
            [_binary("mariadbd"), "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.root / 'mysqld.sock'}",
             f"--pid-file={self.root / 'mysqld.pid'}", "--skip-name-resolve", "--skip-log-bin",
             "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M", *self._user],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "mariadbd.log").read_text(errors="replace")[-3000:])
            try:
                connect(port=self.port).close()
                return
            except pymysql.err.OperationalError:
                time.sleep(0.1)
        raise RuntimeError("private mariadbd did not start in time")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
