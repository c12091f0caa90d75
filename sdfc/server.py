"""Serve an app with waitress: one process (one engine, one GPU), a few request threads.

Why waitress: its I/O loop (one thread, non-blocking sockets) reads each request, headers and body, in full
before a request thread sees it, so a client that drips bytes or goes quiet holds a socket, never a thread,
and progress, options and lists answer while a generation runs. What it lacks is added here:

- deadlines: the headers of a request must arrive within SDFC_HEADER_TIMEOUT_S of its first byte (of the
  connection, for a new one) and its body within SDFC_BODY_TIMEOUT_S after them, however slowly the client
  drips; a connection idle between requests is closed after SDFC_IDLE_TIMEOUT_S (waitress's channel_timeout
  alone would let a client sending a byte a second keep its socket for ever);
- bodies: the I/O loop buffers a little more than SDFC_MAX_BODY_BYTES (chunked ones are de-chunked and
  counted), so the app sees the real length and answers 413 in A1111's shape; a body beyond that is not read
  on and gets the same 413 from here, then the connection closes. A body is never cut short;
- shutdown: SIGTERM (or Ctrl+C) refuses new work at once (503 + Retry-After, `ApiState.refusal`), lets the
  running and the queued jobs finish within SDFC_DRAIN_SECONDS (`ApiState.drain`), drains the records
  dispatcher, waits for the answers to be sent, and exits;
- start: the records dispatcher starts with the server, so that what a previous process left in the spool is
  sent without waiting for a request.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Mapping

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask
from waitress.utilities import RequestEntityTooLarge

from .api.errors import a1111_error
from .api.state import ANSWERS_SENT, DEFAULT_DRAIN_S, DRAIN_ENV
from .app import RECORDS_PIPELINE
from .config import ConfigError

log = logging.getLogger("sdfc.server")
API_STATE = "sdfc"              # app.extensions keys set by sdfc.app.create_app
BACKGROUND = "sdfc.background"  # callables to run once the server listens
# Bodies up to this much over the app's limit are still read, so that the app answers 413 on a connection that
# stays usable; beyond it the I/O loop stops reading (it would otherwise buffer whatever a client sends).
BODY_READ_MARGIN = 1024 * 1024
OUTPUT_BUFFER_BYTES = 256 * 1024 * 1024  # above any answer (FC caps them at 32 MB)


def _env_number(env: Mapping[str, str], name: str, default, kind=float):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise ConfigError(f"{name} must be a positive {kind.__name__}, got {raw!r}")
    return value


@dataclass(frozen=True)
class ServerConfig:
    # Request threads; FC's instanceConcurrency must not exceed it. Idle threads cost little; generations may
    # hold at most SDFC_MAX_QUEUED_JOBS of them, so the rest always answer progress, options and lists.
    threads: int = 16
    header_timeout_s: float = 10.0   # a request's headers, from its first byte (a new connection's: from accept)
    body_timeout_s: float = 60.0     # its body, after the headers (32 MB at 0.5 MB/s)
    idle_timeout_s: int = 60         # a keep-alive connection between requests
    connection_limit: int = 100      # open connections; beyond it, new ones wait in the listen backlog
    drain_s: float = DEFAULT_DRAIN_S     # SIGTERM: how long running and queued jobs may take

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "ServerConfig":
        env = os.environ if env is None else env
        values = dict(
            threads=_env_number(env, "SDFC_THREADS", cls.threads, int),
            header_timeout_s=_env_number(env, "SDFC_HEADER_TIMEOUT_S", cls.header_timeout_s),
            body_timeout_s=_env_number(env, "SDFC_BODY_TIMEOUT_S", cls.body_timeout_s),
            idle_timeout_s=max(1, round(_env_number(env, "SDFC_IDLE_TIMEOUT_S", cls.idle_timeout_s))),
            connection_limit=_env_number(env, "SDFC_CONNECTION_LIMIT", cls.connection_limit, int),
            drain_s=_env_number(env, DRAIN_ENV, DEFAULT_DRAIN_S),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def body_too_large(limit: int):
    """The 413 of sdfc/app.py's handler, for a body the I/O loop refused to read."""
    return a1111_error(413, "HTTPException", f"request body exceeds the limit of {limit} bytes "
                                             "(SDFC_MAX_BODY_BYTES)")


class _ErrorTask(ErrorTask):
    """waitress's own error answers, with 413 in A1111's shape (the others are malformed HTTP: plain text)."""

    def execute(self):
        if not isinstance(self.request.error, RequestEntityTooLarge):
            return super().execute()
        response = body_too_large(self.channel.server.body_limit)
        body = response.get_data()
        self.status = response.status
        self.response_headers.append(("Content-Type", response.content_type))
        self.set_close_on_finish()  # the rest of the body was not read: the connection cannot go on
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    """A connection that owes the server the rest of a request within deadlines (see `overdue`)."""

    error_task_class = _ErrorTask

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map=map)
        self.request_since: float | None = time.monotonic()  # a new connection owes a request at once
        self.body_since: float | None = None

    def received(self, data):
        now = time.monotonic()
        if self.request_since is None:
            self.request_since = now
        result = super().received(data)
        if self.request is None:          # every byte so far belongs to complete requests
            self.request_since = self.body_since = None
        elif self.request.headers_finished and self.body_since is None:
            self.body_since = now
        return result

    def overdue(self, now: float, config: ServerConfig) -> bool:
        if self.requests or self.request_since is None:
            return False  # being answered, or idle between requests (waitress's channel_timeout)
        if self.body_since is not None:
            return now - self.body_since > config.body_timeout_s
        return now - self.request_since > config.header_timeout_s


class _Server(TcpWSGIServer):
    channel_class = _Channel

    def __init__(self, app, config: ServerConfig, adj: Adjustments, body_limit: int):
        self.config, self.body_limit = config, body_limit
        super().__init__(app, adj=adj)

    def maintenance(self, now):
        super().maintenance(now)  # idle connections
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            if isinstance(channel, _Channel) and channel.overdue(mono, self.config):
                channel.will_close = True  # closed by the loop on its next pass

    def quiet(self, besides: int = 0) -> bool:
        """No request being served or waiting for a thread, no answer left to send (read from another thread:
        a snapshot, good enough for polling). `besides`: requests of the caller's own still being served (a
        pre-stop asking whether everything else has been answered)."""
        tasks = self.task_dispatcher
        if tasks.queue or tasks.active_count > besides:
            return False
        try:
            channels = list(self.active_channels.values())
        except RuntimeError:  # changed while copied
            return False
        busy = [c for c in channels if getattr(c, "requests", None) or getattr(c, "total_outbufs_len", 0)]
        return len(busy) <= besides


def make_server(app, host: str, port: int, config: ServerConfig) -> _Server:
    body_limit = app.config.get("MAX_CONTENT_LENGTH") or 32 * 1024 * 1024
    adj = Adjustments(
        host=host, port=port, threads=config.threads,
        channel_timeout=config.idle_timeout_s,
        cleanup_interval=1,  # the deadlines above are checked on each pass of maintenance
        connection_limit=config.connection_limit,
        max_request_body_size=body_limit + BODY_READ_MARGIN,
        # A whole answer is buffered (spilled to a temp file past 1 MB) before its thread is let go: a client
        # that does not read then holds a socket until the idle timeout, never a request thread.
        outbuf_high_watermark=OUTPUT_BUFFER_BYTES,
        ident="sdfc",
    )
    return _Server(app, config, adj, body_limit)


class _Shutdown:
    """SIGTERM/SIGINT → drain in a thread while the I/O loop goes on (it sends the answers and the refusals);
    when done, the same signal sent to the main thread ends the loop."""

    def __init__(self, server: _Server, app, config: ServerConfig):
        self.server, self.app, self.config = server, app, config
        self.started = self.finished = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame):
        if self.finished or (self.started and signum == signal.SIGINT):
            raise SystemExit(0)  # the loop's run() stops its threads and returns; a second Ctrl+C: at once
        if self.started:
            return
        self.started = True
        state = self.app.extensions.get(API_STATE)
        if state is not None:
            state.draining = True  # refused from now on, before the drain thread even runs
        log.info("signal %d: draining for up to %.0f s", signum, self.config.drain_s)
        threading.Thread(target=self._drain, name="sdfc-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_s
        try:
            state = self.app.extensions.get(API_STATE)
            pipeline = self.app.extensions.get(RECORDS_PIPELINE)
            dispatch_drain_s = state.settings.dispatch_drain_s if state is not None else 5.0
            records_s = min(dispatch_drain_s, self.config.drain_s / 4)
            # The jobs get the budget less what the records and the last answers need; an interrupted job
            # stops at its next sampling step.
            tail = records_s + min(5.0, self.config.drain_s / 4)
            jobs_done = state.drain(max(0.0, self.config.drain_s - tail), grace=tail - records_s) \
                if state is not None else True
            records_done = pipeline.close(max(0.0, min(records_s, deadline - time.monotonic()))) \
                if pipeline is not None else True
            while not self.server.quiet() and time.monotonic() < deadline:
                time.sleep(0.05)
            log.info("drained: jobs %s, records %s, answers %s", "done" if jobs_done else "cut short",
                     "done" if records_done else "left in the spool", "sent" if self.server.quiet() else "cut")
        except Exception:  # noqa: BLE001 - whatever happened, the process must still exit
            log.exception("drain failed")
        finally:
            self.finished = True
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


def _start_background(app) -> None:
    """What must run from the start of the serving process, not from its first request: the records
    dispatcher (it flushes what a previous process left in the spool) and the task worker (it takes the tasks
    queued while no instance ran). Each registers its start in create_app; none may stop the serving."""
    for start in app.extensions.get(BACKGROUND, ()):
        try:
            start()
        except Exception:  # noqa: BLE001 - serving goes on; records wait in the spool, tasks in the store
            log.exception("background start failed: %s", getattr(start, "__qualname__", start))


def serve(app, host: str, port: int, config: ServerConfig | None = None) -> None:
    config = config or ServerConfig.from_env()
    server = make_server(app, host, port, config)
    _Shutdown(server, app, config).install()
    _start_background(app)
    # FC's /pre-stop asks whether every other answer has left (sdfc/fc/lifecycle.py).
    app.extensions[ANSWERS_SENT] = lambda: server.quiet(besides=1)
    log.info("sdfc listening on http://%s:%s (%d threads, drain %.0f s)",
             f"[{host}]" if ":" in host else host, server.effective_port, config.threads, config.drain_s)
    server.run()
    log.info("server stopped")
