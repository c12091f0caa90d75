"""Application factory: compose the blueprints into one Flask app.

Locally `sdfc serve` mounts every part in one process; each FC function is another composition of the same
blueprints (see functions/).
"""
from __future__ import annotations

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
from .records import OutputsStore, RecordWriter, open_store
from .records.gallery import make_gallery_blueprint

log = logging.getLogger("sdfc.access")
OPEN_PATHS = ("/docs", "/openapi.json", "/static/swagger/")


def create_app(settings: Settings | None = None, engine: Engine | None = None,
               on_images: Callable[[list[dict]], None] | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    pipeline = None
    if on_images is None and settings.dispatch != "off":
        pipeline, on_images = _records(app, settings)
    app.extensions["sdfc"] = ApiState(settings, engine=engine, on_images=on_images)
    app.register_blueprint(sdapi_bp)
    app.register_blueprint(docs_bp)
    _install_request_hooks(app, settings, pipeline)
    _install_error_handlers(app)
    return app


def _records(app: Flask, settings: Settings) -> tuple[RecordPipeline, Callable[[list[dict]], None]]:
    """The records room: store + outputs + writer, the dispatcher that feeds it, and the gallery API.

    Nothing connects here (the app may be built in gunicorn's master and forked): the store connects on
    first use and the dispatcher's worker starts in the process that serves requests.
    """
    store = open_store(settings.database_url)
    outputs = OutputsStore(settings.outputs_dir)
    writer = RecordWriter(store, outputs)
    pipeline = build_pipeline(settings, outputs, local_handler=writer.handle)
    app.extensions["sdfc.records"] = pipeline
    app.extensions["sdfc.records_store"] = store
    app.register_blueprint(make_gallery_blueprint(store))
    return pipeline, pipeline.sink


def _is_open(path: str, settings: Settings) -> bool:
    return settings.docs_open and any(path == p or path.startswith(p) for p in OPEN_PATHS)


def _install_request_hooks(app: Flask, settings: Settings, pipeline: RecordPipeline | None = None) -> None:
    @app.before_request
    def _begin():
        g.started = time.perf_counter()
        g.request_id = request.headers.get("x-fc-request-id") or uuid.uuid4().hex
        if pipeline is not None:
            pipeline.observe_request(request.headers)  # FC's role credentials; flushes leftovers at start
        if request.method == "OPTIONS" and settings.cors_origins:
            return app.make_default_options_response()  # CORS preflight carries no credentials
        if _is_open(request.path, settings) or request.url_rule is None or auth.is_public(app, request.endpoint):
            return None  # unknown paths answer 404 without asking for credentials, as A1111
        return auth.check(settings.auth)

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
        return a1111_error(exc.status, exc.error, exc.detail, exc.errors)

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
        log.error("engine error: %s", exc)
        return a1111_error(500, type(exc).__name__, str(exc), str(exc))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # Log the trace for operators; the client gets A1111's shape without it.
        log.exception("unhandled error")
        return a1111_error(500, type(exc).__name__, "", str(exc))
