"""Start the real `sdfc serve` process on a free port and wait until it answers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

USER, PASSWORD = "alice", "Wonder-land42"
SECOND_USER, SECOND_PASSWORD = "bob", "Build3r!bob"
AUTH = f"{USER}:{PASSWORD},{SECOND_USER}:{SECOND_PASSWORD}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(tmp: Path, env: dict | None = None, host: str = "127.0.0.1", args: tuple = (),
                 wait: bool = True, unset: tuple = (), preexec_fn=None) -> LiveServer:
    """`unset`: variables of this environment the server must not see; `preexec_fn`: run in the child before
    it starts (resource limits)."""
    port = free_port()
    full_env = dict(os.environ, SDFC_AUTH=AUTH, SDFC_DATA_DIR=str(tmp / "data"), PYTHONUNBUFFERED="1")
    for name in unset:
        full_env.pop(name, None)
    full_env.update(env or {})
    log_path = tmp / f"server-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "sdfc.cli", "serve", "--host", host, "--port", str(port), *args],
        env=full_env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    server = LiveServer(process, f"http://127.0.0.1:{port}", port, log_path)
    if wait:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                requests.get(server.url + "/openapi.json", timeout=1)
                return server
            except requests.ConnectionError:
                time.sleep(0.1)
        server.stop()
        raise RuntimeError(f"server did not answer in 60 s:\n{server.log()}")
    return server
