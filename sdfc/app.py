"""Application factory: compose the parts (blueprints and the rooms behind them) into one Flask app.

Locally `sdfc serve` mounts every part in one process; each FC function is another composition of the same
parts (sdfc/fc/compose.py). A part that is not mounted has no routes (404) and builds nothing: a composition
without the gallery or the task parts opens no records store, one without the A1111 API starts no dispatcher.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from typing import Callable

from flask import Flask, g, request
from werkzeug.exceptions import HTTPException

from .api import auth
from .api.docs import bp as docs_bp
from .api.errors import ApiError, ValidationFailed, a1111_error, json_response
from .api.routes import bp as sdapi_bp
from .api.state import ApiState
from .config import Settings
from .dispatch import RecordPipeline, build_pipeline
from .engine import Engine, EngineError, InvalidRequestError
from .fc import gateway
from .jobs import build_jobs
from .jobs.api import EXTENSION as JOBS_EXTENSION
from .jobs.api import bp as tasks_bp
from .jobs.api import status_bp as task_status_bp
from .records import OutputsStore, RecordWriter, open_store
from .records.gallery import make_gallery_blueprint
from .web import bp as web_bp

log = logging.getLogger("sdfc.access")
OPEN_PATHS = ("/docs", "/openapi.json", "/static/swagger/")

# The parts a composition may mount. "tasks" submits, cancels and runs tasks; "task-status" answers what the
# store knows about them (status, result, list, A1111's /internal/progress), wherever they run.
PARTS = frozenset({"sdapi", "tasks", "task-status", "gallery", "web", "docs"})
ALL_PARTS = PARTS
RECORDS_PIPELINE = "sdfc.records"      # the dispatcher that carries image records to the records room
RECORDS_STORE = "sdfc.records_store"   # the records database (generated_images, generation_tasks)


def create_app(settings: Settings | None = None, engine: Engine | None = None,
               on_images: Callable[[list[dict]], None] | None = None,
               parts: frozenset[str] | set[str] = ALL_PARTS) -> Flask:
    settings = settings or Settings.from_env()
    parts = frozenset(parts)
    if parts - PARTS or not parts:
        raise ValueError(f"unknown parts {sorted(parts - PARTS)}; valid: {sorted(PARTS)}" if parts - PARTS
                         else "a composition needs at least one part")
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["sdfc.parts"] = parts
    app.extensions["sdfc.background"] = []  # started by the server once it listens (sdfc/server.py)
    store = open_store(settings.database_url) if parts & {"gallery", "tasks", "task-status"} else None
    pipeline = None
    if "sdapi" in parts and on_images is None and settings.dispatch != "off":
        pipeline = _records_pipeline(app, settings, store)
        on_images = pipeline.sink
    state = ApiState(settings, engine=engine, on_images=on_images)
    app.extensions["sdfc"] = state
    if store is not None:
        app.extensions[RECORDS_STORE] = store
    if "sdapi" in parts:
        app.register_blueprint(sdapi_bp)
    if "docs" in parts:
        app.register_blueprint(docs_bp)
    if "web" in parts:
        app.register_blueprint(web_bp)  # the pages at / and /images; their API calls go to the other parts
    if "gallery" in parts:
        app.register_blueprint(make_gallery_blueprint(store, admins=settings.admins,
                                                      auth_enabled=bool(settings.auth),
                                                      currency=settings.pricing.currency))
    if parts & {"tasks", "task-status"}:
        _jobs(app, settings, state, store, runs_tasks="tasks" in parts)
    _install_request_hooks(app, settings, pipeline)
    _install_error_handlers(app)
    return app


def _records_pipeline(app: Flask, settings: Settings, store) -> RecordPipeline:
    """The records room's intake: image files to the outputs store, record events through the dispatcher to the
    writer (in this process with dispatch `local`, else the records function).

    Nothing connects here (the app may be built before the serving process starts its threads): the store
    connects on first use and the dispatcher's worker starts in the process that serves requests.
    """
    outputs = OutputsStore(settings.outputs_dir)
    writer = None
    if settings.dispatch == "local":
        writer = RecordWriter(store or open_store(settings.database_url), outputs)
    pipeline = build_pipeline(settings, outputs, local_handler=writer.handle if writer else None)
    app.extensions[RECORDS_PIPELINE] = pipeline
    app.extensions["sdfc.background"].append(pipeline.start)
    return pipeline


def _jobs(app: Flask, settings: Settings, state: ApiState, store, runs_tasks: bool) -> None:
    """The jobs room: tasks in the records database (generation_tasks); with "tasks" also submits, cancels and
    the worker (SDFC_TASK_WORKER), with "task-status" the read side."""
    if not runs_tasks:
        settings = dataclasses.replace(settings, task_worker="off")
    pipeline = app.extensions.get(RECORDS_PIPELINE)
    room = build_jobs(settings, store, OutputsStore(settings.outputs_dir), state,
                      credentials=pipeline.credentials if pipeline is not None else None)
    app.extensions[JOBS_EXTENSION] = room
    if runs_tasks:
        app.register_blueprint(tasks_bp)
        app.extensions["sdfc.background"].append(room.start)
    if "task-status" in app.extensions["sdfc.parts"]:
        app.register_blueprint(task_status_bp)


def _is_open(path: str, settings: Settings) -> bool:
    return settings.docs_open and any(path == p or path.startswith(p) for p in OPEN_PATHS)


def _install_request_hooks(app: Flask, settings: Settings, pipeline: RecordPipeline | None = None) -> None:
    @app.before_request
    def _refuse_while_draining():
        # Shutting down (SIGTERM, FC's pre-stop): new work gets 503 + Retry-After at once, before any auth or I/O.
        return app.extensions["sdfc"].refusal()

    @app.before_request
    def _begin():
        g.started = time.perf_counter()
        # A correlation id for logs only (records get their own key per generation): FC's request id where
        # FC's gateway set it, the caller's for an event replayed by /invoke, else a fresh one.
        g.request_id = (request.environ.get(gateway.PARENT_REQUEST_ID)
                        or gateway.request_id(request.headers, settings.in_fc) or uuid.uuid4().hex)
        if pipeline is not None:
            pipeline.start()  # flushes what a previous process left in the spool
        if request.method == "OPTIONS" and settings.cors_origins:
            return app.make_default_options_response()  # CORS preflight carries no credentials
        hook = auth.platform_hook_of(app, request.endpoint)
        if hook is not None:
            refused = _platform_hook_refusal(hook, settings)
        elif _is_open(request.path, settings) or request.url_rule is None or auth.is_public(app, request.endpoint):
            return None  # unknown paths answer 404 without asking for credentials, as A1111
        else:
            refused = auth.check(settings.auth)
        if refused is None and pipeline is not None and settings.in_fc:
            # FC's role credentials, only from a request that passed and came through FC's gateway.
            pipeline.remember_credentials(request.headers)
        return refused

    @app.after_request
    def _finish(response):
        response.headers["X-Process-Time"] = f"{time.perf_counter() - g.get('started', time.perf_counter()):.4f}"
        response.headers["X-Request-Id"] = g.get("request_id", "")
        origin = request.headers.get("Origin", "").rstrip("/")
        if origin and origin in settings.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type")
            response.headers["Vary"] = "Origin"
        _log_request(response)
        return response


def _platform_hook_refusal(control_path: str, settings: Settings):
    """FC's lifecycle and event hooks: in FC only FC's own call of that hook passes (a client's request arrives
    with x-fc-control-path /http-invoke, and cannot forge it); outside FC, where nobody can tell FC's calls
    from a client's, only Basic credentials do."""
    if not settings.in_fc:
        return auth.check(settings.auth)
    if gateway.is_platform_call(request.headers, settings.in_fc, control_path):
        return None
    return json_response({"detail": "Not Found"}, 404)


def _log_request(response) -> None:
    # One JSON line per request: FC ships stdout to its log service, where these are searchable.
    entry = {
        "request_id": g.get("request_id"), "method": request.method, "route": request.path,
        "status": response.status_code,
        "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 1),
        "request_bytes": request.content_length or 0, "response_bytes": response.calculate_content_length(),
    }
    entry.update(g.get("log_extra", {}))
    log.info(json.dumps(entry))


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return a1111_error(exc.status, exc.error, exc.detail, exc.errors, headers=exc.headers)

    @app.errorhandler(ValidationFailed)
    def _validation(exc: ValidationFailed):
        return json_response({"detail": exc.details}, 422)

    @app.errorhandler(InvalidRequestError)
    def _invalid(exc: InvalidRequestError):
        return a1111_error(400, "ValueError", str(exc), str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if exc.code in (404, 405):
            return json_response({"detail": "Not Found" if exc.code == 404 else "Method Not Allowed"}, exc.code,
                                 headers=dict(exc.get_headers()) if exc.code == 405 else None)
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            return a1111_error(413, "HTTPException", f"request body exceeds the limit of {limit} bytes "
                                                     "(SDFC_MAX_BODY_BYTES)")
        return a1111_error(exc.code or 500, "HTTPException", exc.description or "")

    @app.errorhandler(EngineError)
    def _engine(exc: EngineError):
        return _internal_error(exc, "engine error")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        return _internal_error(exc, "unhandled error")


def _internal_error(exc: Exception, what: str):
    """A1111's 500 shape, without the exception's text (paths, hosts, library internals): the trace goes to
    the log under the request id, which the body names so that an operator can find it."""
    request_id = g.get("request_id") or uuid.uuid4().hex
    log.error("%s in request %s", what, request_id, exc_info=exc)
    message = f"internal error, request id {request_id}"
    return a1111_error(500, "InternalServerError", message, message)
