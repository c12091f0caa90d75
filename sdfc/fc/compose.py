"""What each FC function serves: a composition of `create_app`'s parts plus the FC glue that function needs.

- sd-api (GPU, custom container): the A1111 API, the task API that submits and runs tasks (tasks in RDS), their
  docs, and FC's lifecycle routes; /pre-stop also drains the records dispatcher, so that no record is left in a
  spool that dies with the instance. No pages and no gallery: every request to this function may wake a GPU.
- web (CPU, built-in runtime): pages, gallery, what the store knows about tasks (A1111's /internal/progress
  for a task that runs on sd-api) and docs. No A1111 API part, so it never loads a model and never
  dispatches records (the custom domain routes /sdapi/* to sd-api).
"""
from __future__ import annotations

from flask import Flask

from ..app import RECORDS_PIPELINE, create_app
from ..config import Settings
from . import lifecycle

SDAPI_PARTS = frozenset({"sdapi", "tasks", "task-status", "docs"})
WEB_PARTS = frozenset({"web", "gallery", "task-status", "docs"})


def create_sdapi_app(settings: Settings | None = None,
                     hooks_config: lifecycle.LifecycleConfig | None = None) -> Flask:
    app = create_app(settings or Settings.from_env(), parts=SDAPI_PARTS)
    hooks = lifecycle.mount(app, hooks_config)
    pipeline = app.extensions.get(RECORDS_PIPELINE)
    if pipeline is not None:
        hooks.drains.append(pipeline.close)
    return app


def create_web_app(settings: Settings | None = None) -> Flask:
    return create_app(settings or Settings.from_env(), parts=WEB_PARTS)
