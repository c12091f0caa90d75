"""What each FC function serves: `create_app`'s blueprints plus the FC glue that function needs.

- sd-api (GPU, custom container): the A1111 API and its docs plus FC's lifecycle routes; /pre-stop also drains
  the records dispatcher, so that no record is left in a spool that dies with the instance. The gallery and
  pages answer 404 there: every request to this function may wake a GPU, and its records store is not RDS.
- web (CPU, built-in runtime): gallery, docs and pages. It never loads a model: /sdapi/* answers 404 there
  (the custom domain routes /sdapi/* to sd-api), so that browsing never runs the engine on a CPU.
"""
from __future__ import annotations

from flask import Flask, request

from ..api.auth import is_public, platform_hook_of
from ..api.errors import json_response
from ..app import create_app
from ..config import Settings
from . import lifecycle

RECORDS_EXTENSION = "sdfc.records"  # where create_app keeps the records pipeline
SDAPI_PATHS = ("/sdapi/", "/docs", "/openapi.json", "/static/swagger/")


def _not_here(function: str):
    return json_response({"detail": f"Not Found: this path is served by the {function} function"}, 404)


def create_sdapi_app(settings: Settings | None = None,
                     hooks_config: lifecycle.LifecycleConfig | None = None) -> Flask:
    app = create_app(settings or Settings.from_env())
    hooks = lifecycle.mount(app, hooks_config)
    pipeline = app.extensions.get(RECORDS_EXTENSION)
    if pipeline is not None:
        hooks.drains.append(pipeline.close)

    @app.before_request
    def _api_only():
        if (request.url_rule is not None and not request.path.startswith(SDAPI_PATHS)
                and not is_public(app, request.endpoint) and platform_hook_of(app, request.endpoint) is None):
            return _not_here("web (CPU)")
        return None

    return app


def create_web_app(settings: Settings | None = None) -> Flask:
    app = create_app(settings or Settings.from_env())

    @app.before_request
    def _no_generation_here():
        if request.path.startswith("/sdapi/"):
            return _not_here("sd-api (GPU)")
        return None

    return app
