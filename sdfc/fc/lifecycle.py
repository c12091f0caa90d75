"""FC's instance lifecycle on sd-api: `POST /initialize`, `GET /pre-stop`, and event calls on `POST /invoke`.

FC calls these itself, without the client's Basic credentials. They are platform hooks (sdfc/api/auth.py):
in FC each answers only FC's own call of it, told by the `x-fc-control-path` header FC's gateway sets and
clients cannot (sdfc/fc/gateway.py); anything else gets 404, as for a route that does not exist. Outside FC
(the image run by hand) nobody can tell FC's calls from a client's, so they need Basic credentials there.
`/invoke` replays the request inside its event through the whole app, Basic auth included, and refuses any
event that the app would route to a hook (itself included), however the path is spelled.

The server listens before any model is loaded (FC wants a listening port within 120 s); `/initialize` then
creates the ONNX sessions and runs one denoising step at each size of SDFC_WARMUP_SIZES (up to 300 s are
allowed), so that the first client does not pay for reading the weights, session creation, CUDA context set-up,
kernel loading, the arena's growth and cuDNN's algorithm search. That search is per input shape, so each size
is warmed with the UNet batches requests use: 2 (prompt and negative prompt, any CFG scale but 1) and 1 (CFG
scale 1, where no unconditional batch runs).
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
from ..engine import GenerationRequest, device_info
from ..jobs.api import EXTENSION as JOBS_EXTENSION
from ..jobs.fc_async import task_of_event
from . import events, gateway

log = logging.getLogger("sdfc.fc")
bp = Blueprint("fc", __name__)
EXTENSION = "sdfc.fc"
DEFAULT_WARMUP_SIZES = "512x512"  # SD 1.x's size: what most requests ask for
# The CFG scales of the warm-up jobs: 7 runs the UNet on batch 2 (cond + uncond), 1 on batch 1.
WARMUP_CFG_SCALES = (7.0, 1.0)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`512x512,768x512` → ((512, 512), (768, 512)); "" or "0" → none. WxH, each a multiple of 8."""
    sizes = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part in ("", "0", "none"):
            continue
        try:
            width, height = (int(v) for v in part.split("x"))
        except ValueError:
            raise ValueError(f"SDFC_WARMUP_SIZES: {part!r} is not WIDTHxHEIGHT (e.g. 512x512)") from None
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise ValueError(f"SDFC_WARMUP_SIZES: {part!r} must be multiples of 8 of at least 8")
        sizes.append((width, height))
    return tuple(sizes)


@dataclass
class LifecycleConfig:
    warmup_sizes: tuple[tuple[int, int], ...] = parse_sizes(DEFAULT_WARMUP_SIZES)  # () skips the warm-up
    require_cuda: bool = False        # fail /initialize when onnxruntime fell back to the CPU
    drain_s: float = DEFAULT_DRAIN_S  # under FC's 90 s PreStop limit

    @classmethod
    def from_env(cls, env=None) -> "LifecycleConfig":
        env = os.environ if env is None else env
        return cls(warmup_sizes=parse_sizes(env.get("SDFC_WARMUP_SIZES", DEFAULT_WARMUP_SIZES)),
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
    if lifecycle.config.require_cuda and (report["cpu_fallbacks"] or "CUDAExecutionProvider" not in
                                          report["providers"]):
        lifecycle.ready = None
        stack = report["gpu_stack"]
        return a1111_error(500, "RuntimeError", "SDFC_REQUIRE_CUDA is set but onnxruntime runs "
                           f"{', '.join(report['cpu_fallbacks']) or 'the model'} on the CPU: no GPU is attached, "
                           "or the driver is too old for this image's "
                           f"CUDA (driver {stack['driver']}, supports CUDA {stack['driver_cuda']}; the CUDA 13 "
                           "image needs 13.0, else build with --build-arg CUDA=12)")
    return json_response(report)


def _load_and_warm(api, config: LifecycleConfig) -> dict:
    started = time.perf_counter()
    engine = api.engine            # scans the models folder
    model = engine.load()          # creates the four ONNX sessions
    loaded = time.perf_counter()
    warmed = {}
    for width, height in config.warmup_sizes:
        began = time.perf_counter()
        for cfg_scale in WARMUP_CFG_SCALES:
            with api.queue:        # each warm-up is a job like any other: never beside a client's
                engine.generate(GenerationRequest(prompt="", width=width, height=height, steps=1, seed=0,
                                                  cfg_scale=cfg_scale))
        warmed[f"{width}x{height}"] = round(time.perf_counter() - began, 3)
    report = {"model": model.info.title, "providers": list(model.providers),
              "cpu_fallbacks": list(model.cpu_fallbacks),  # components CUDA was asked for but the CPU runs
              "load_s": round(loaded - started, 3), "warmup_s": round(time.perf_counter() - loaded, 3),
              "warmup_sizes": warmed,
              # Read after the sessions exist, when onnxruntime has loaded its CUDA libraries (all None on a CPU).
              "gpu_stack": device_info.gpu_stack()}
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
        return _mark_for_fc(json_response(body, status), status)
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
    return _mark_for_fc(json_response(result), result["statusCode"])


def _mark_for_fc(response, status: int):
    for name, value in gateway.invocation_outcome_headers(status).items():
        response.headers[name] = value
    return response


def _settings():
    return current_app.extensions["sdfc"].settings


def _event_failed(status: int, detail: str):
    return _mark_for_fc(a1111_error(status, "EventError", detail), status)
