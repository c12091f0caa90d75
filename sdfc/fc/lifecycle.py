"""FC's instance lifecycle on sd-api: `POST /initialize`, `GET /pre-stop`, and event calls on `POST /invoke`.

FC calls these itself, without the client's Basic credentials. They are platform hooks (sdfc/api/auth.py):
in FC each answers only FC's own call of it, told by the `x-fc-control-path` header FC's gateway sets and
clients cannot (sdfc/fc/gateway.py); anything else gets 404, as for a route that does not exist. Outside FC
(the image run by hand) nobody can tell FC's calls from a client's, so they need Basic credentials there.
`/invoke` replays the request inside its event through the whole app, Basic auth included, and refuses any
event that the app would route to a hook (itself included), however the path is spelled.

The server listens before any model is loaded (FC wants a listening port within 120 s); `/initialize` then
creates the ONNX sessions and runs one denoising step at the smallest size (up to 300 s are allowed), so that
the first client does not pay for reading the weights, session creation, CUDA context set-up, kernel loading
and cuDNN's algorithm search. That search is per input shape: SDFC_WARMUP_SIZE=512 also covers the shapes of
512x512 requests, for a few more seconds of initializer.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from flask import Blueprint, Flask, current_app, g, request

from ..api.auth import platform_hook, platform_hook_of
from ..api.errors import a1111_error, json_response
from ..api.state import ANSWERS_SENT, DEFAULT_DRAIN_S, drain_seconds
from ..engine import GenerationRequest
from ..jobs.api import EXTENSION as JOBS_EXTENSION
from ..jobs.fc_async import task_of_event
from . import events, gateway

log = logging.getLogger("sdfc.fc")
bp = Blueprint("fc", __name__)
EXTENSION = "sdfc.fc"
SMALLEST_SIZE = 64  # A1111's minimum width/height: an 8×8 latent


@dataclass
class LifecycleConfig:
    warmup_size: int = SMALLEST_SIZE  # 0 skips the warm-up step
    require_cuda: bool = False        # fail /initialize when onnxruntime fell back to the CPU
    drain_s: float = DEFAULT_DRAIN_S  # under FC's 90 s PreStop limit

    @classmethod
    def from_env(cls, env=None) -> "LifecycleConfig":
        env = os.environ if env is None else env
        return cls(warmup_size=int(env.get("SDFC_WARMUP_SIZE") or SMALLEST_SIZE),
                   require_cuda=env.get("SDFC_REQUIRE_CUDA", "0") in ("1", "true", "yes"),
                   drain_s=drain_seconds(env))


@dataclass
class Lifecycle:
    config: LifecycleConfig
    ready: dict | None = None  # what /initialize reported, once it succeeded
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Called with the seconds left by /pre-stop once requests are done (e.g. the records dispatcher's close).
    drains: list[Callable[[float], bool]] = field(default_factory=list)


def mount(app: Flask, config: LifecycleConfig | None = None) -> Lifecycle:
    """Add the lifecycle routes to an app built by `create_app`."""
    lifecycle = Lifecycle(config or LifecycleConfig.from_env())
    app.extensions[EXTENSION] = lifecycle
    app.register_blueprint(bp)
    return lifecycle


def _state():
    return current_app.extensions["sdfc"], current_app.extensions[EXTENSION]


@bp.post("/initialize")
@platform_hook("/initialize")
def initialize():
    api, lifecycle = _state()
    with lifecycle.lock:  # FC calls once; a stray second call waits for the first and gets its report
        if lifecycle.ready is None:
            lifecycle.ready = _load_and_warm(api, lifecycle.config)
        report = lifecycle.ready
    if lifecycle.config.require_cuda and "CUDAExecutionProvider" not in report["providers"]:
        lifecycle.ready = None
        return a1111_error(500, "RuntimeError", "SDFC_REQUIRE_CUDA is set but onnxruntime runs on "
                           f"{report['providers']}: the image lacks the CUDA 13 / cuDNN 9 libraries or no GPU "
                           "is attached")
    return json_response(report)


def _load_and_warm(api, config: LifecycleConfig) -> dict:
    started = time.perf_counter()
    engine = api.engine            # scans the models folder
    model = engine.load()          # creates the four ONNX sessions
    loaded = time.perf_counter()
    if config.warmup_size:
        size = config.warmup_size
        with api.queue:            # the warm-up is a job like any other: never beside a client's
            engine.generate(GenerationRequest(prompt="", width=size, height=size, steps=1, seed=0))
    report = {"model": model.info.title, "providers": list(model.providers),
              "load_s": round(loaded - started, 3), "warmup_s": round(time.perf_counter() - loaded, 3),
              "warmup_size": config.warmup_size}
    log.info("initialized: %s", report)
    return report


@bp.get("/pre-stop")
@platform_hook("/pre-stop")
def pre_stop():
    api, lifecycle = _state()
    deadline = time.monotonic() + lifecycle.config.drain_s
    # Refuse new work, let running and queued jobs finish (past the budget they fail cleanly), as SIGTERM does.
    idle = api.drain(lifecycle.config.drain_s * 0.9, grace=lifecycle.config.drain_s * 0.05)
    drained = [drain(max(0.0, deadline - time.monotonic())) for drain in lifecycle.drains]
    # FC stops the instance once this returns: the other answers must have left, not only been computed.
    answers_sent = current_app.extensions.get(ANSWERS_SENT)
    while answers_sent is not None and not answers_sent() and time.monotonic() < deadline:
        time.sleep(0.02)
    body = {"drained": idle and all(drained), "in_flight": api.in_flight}
    log.info("pre-stop: %s", body)
    return json_response(body, 200 if body["drained"] else 503)


@bp.post("/invoke")
@platform_hook("/invoke")
def invoke():
    app = current_app._get_current_object()
    jobs = app.extensions.get(JOBS_EXTENSION)
    task_id = task_of_event(request.get_data()) if jobs is not None else None
    if task_id is not None:  # a task handed to FC's async queue (sdfc/jobs/fc_async.py): run it here
        status, body = jobs.run_handed_off(task_id)
        response = json_response(body, status)
        if status >= 400:
            response.headers["x-fc-status"] = "404"  # FC retries it, on an instance that is not going away
        return response
    try:
        call = events.call_from_event(request.get_data())
        # The invocation's trusted x-fc-* headers (role credentials) travel on; none outside FC, and never the
        # control path: the replayed request is no call of FC's.
        fc_headers = {k: v for k, v in gateway.trusted_headers(request.headers, _settings().in_fc).items()
                      if k != gateway.CONTROL_PATH}
        environ = events.environ_for(call, fc_headers, request_id=g.request_id)
    except events.EventError as exc:
        return _event_failed(400, str(exc))
    # Resolved by the app's own URL map on the environ that will run, so no spelling of the path
    # (percent-encoding, doubled slashes, ...) can reach a hook: no nesting, no second drain or load.
    if platform_hook_of(app, events.endpoint_for(app, environ)) is not None:
        return _event_failed(400, f"{call.path} is one of FC's hooks and cannot be called through /invoke")
    result = events.run_environ(app, environ)
    response = json_response(result)
    if result["statusCode"] >= 400:
        response.headers["x-fc-status"] = "404"  # FC counts the invocation failed: async retries apply
    return response


def _settings():
    return current_app.extensions["sdfc"].settings


def _event_failed(status: int, detail: str):
    response = a1111_error(status, "EventError", detail)
    response.headers["x-fc-status"] = "404"
    return response
