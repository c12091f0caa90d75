"""The task API (`/sdapi/v2/tasks`) and A1111's own job surface (`/internal/progress`, `/internal/pending-tasks`).

Every answer comes from the task store, so it is right whichever instance a request reaches. A user sees and
cancels only their own tasks (another user's answer 404, so that ids do not leak); SDFC_ADMINS see all.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from datetime import datetime, timezone

from flask import Blueprint, current_app, request

from ..api import auth
from ..api.errors import ApiError, a1111_error, json_response
from ..records.store import StoreUnavailable
from .runner import preview_step
from .schema import STATUSES

log = logging.getLogger("sdfc.jobs")
# Two parts (sdfc/app.py): `bp` submits and cancels tasks (the composition that runs them); `status_bp` reads
# the store (any composition sharing the database, e.g. the web function answering /internal/progress).
bp = Blueprint("tasks", __name__)
status_bp = Blueprint("task_status", __name__)
EXTENSION = "sdfc.jobs"
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9()_.:-]{0,63}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
MAX_PAGE_SIZE = 100


def room():
    return current_app.extensions[EXTENSION]


def caller() -> str:
    """The Basic-auth user (auth has already passed); "" when the server runs without SDFC_AUTH."""
    return auth.user_of()


def is_admin(user: str) -> bool:
    return not room().auth_enabled or user in room().admins


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds") if ts else None


def task_view(task: dict) -> dict:
    return {
        "task_id": task["id"], "type": task["type"], "status": task["status"],
        "progress": round(float(task["progress"] or 0.0), 4), "step": task["step"] or 0,
        "steps": task["steps"] or 0, "eta": round(task["eta"], 3) if task["eta"] is not None else None,
        "created_at": _iso(task["created_at"]), "started_at": _iso(task["started_at"]),
        "finished_at": _iso(task["finished_at"]), "error": task["error"], "user": task["user"],
        "gpu_seconds": task["gpu_seconds"], "cost": task["cost"], "loss": task["loss"],
    }


def _own_task(task_id: str) -> dict:
    """The caller's task, or 404 for a missing one and for someone else's alike."""
    if not TASK_ID.fullmatch(task_id):
        raise ApiError(404, f"task {task_id!r} not found", error="NotFound")
    r = room()
    r.store.reap()
    task = r.store.get(task_id)
    user = caller()
    if task is None or (task["user"] != user and not is_admin(user)):
        raise ApiError(404, f"task {task_id!r} not found", error="NotFound")
    return task


def submit(mode: str, values: dict) -> tuple[dict, bool]:
    """Queue an already-validated request; (task, created). Shared by v2 submits."""
    r = room()
    # sdfc's own ids start with a letter, as FC's async task ids must (sdfc/jobs/fc_async.py).
    task_id = values.get("force_task_id") or f"sdfc-{uuid.uuid4().hex}"
    if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id):
        raise ApiError(422, "force_task_id must be 1-64 characters: letters, digits and ()_.:-")
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "Idempotency-Key must be 1-255 printable ASCII characters without spaces")
    user = caller()
    if key:
        existing = r.store.find_idempotent(user, key)
        if existing:
            return existing, False
    task, created = r.create_task(task_id, mode, user, values, idempotency_key=key)
    if created:
        try:
            r.hand_off(task)
        except Exception as exc:  # noqa: BLE001 - FC unreachable, no credentials: the task must not linger
            log.warning("task %s could not be handed off: %s", task_id, exc)
            r.store.abandon(task_id, "the task could not be handed to an executor (FC's async invocation failed)")
            raise ApiError(503, "the task could not be queued right now; submit it again",
                           error="ServiceUnavailable", headers={"Retry-After": "5"}) from None
    return task, created


def _submit_route(mode: str):
    from ..api.generation import validate_generation
    from ..api.routes import generation_values

    values = generation_values(mode)
    validate_generation(current_app.extensions["sdfc"], values, mode)  # 4xx before anything is queued
    task, _ = submit(mode, values)
    return json_response({"task_id": task["id"], "status": task["status"]}, 202)


@bp.errorhandler(StoreUnavailable)
@status_bp.errorhandler(StoreUnavailable)
def _store_unavailable(exc: StoreUnavailable):
    # The cause (host, driver error) is for the log only, as in the gallery.
    log.warning("tasks: records database unavailable: %s", exc)
    return a1111_error(503, "StoreUnavailable", "the task database is unavailable right now; try again",
                       headers={"Retry-After": str(int(getattr(exc, "retry_after", 5) or 5))})


@bp.post("/sdapi/v2/tasks/txt2img")
def submit_txt2img():
    return _submit_route("txt2img")


@bp.post("/sdapi/v2/tasks/img2img")
def submit_img2img():
    return _submit_route("img2img")


def _submit_training(kind: str):
    """A training job (sdfc/jobs/training_requests.py validates it; the runner runs it in a child process)."""
    from ..api.routes import body_json
    from .training_requests import KINDS, validate

    settings = current_app.extensions["sdfc"].settings
    values = validate(body_json(), settings.training_dir, getattr(settings, KINDS[kind][2]), kind)
    task, _ = submit(kind, values)
    return json_response({"task_id": task["id"], "status": task["status"]}, 202)


@bp.post("/sdapi/v2/tasks/train-lora")
def submit_train_lora():
    return _submit_training("train-lora")


@bp.post("/sdapi/v2/tasks/train-embedding")
def submit_train_embedding():
    return _submit_training("train-embedding")


@status_bp.get("/sdapi/v2/tasks/<task_id>")
def get_task(task_id: str):
    return json_response(task_view(_own_task(task_id)))


@status_bp.get("/sdapi/v2/tasks/<task_id>/result")
def get_result(task_id: str):
    task = _own_task(task_id)
    if task["status"] in ("queued", "running"):
        raise ApiError(409, f"task {task_id} is {task['status']}: its result is not ready", error="Conflict")
    if not task["result_key"]:  # cancelled before it ran, or its instance died
        detail = task["error"] or f"task {task_id} was {task['status']} before it produced a result"
        raise ApiError(410 if task["status"] == "cancelled" else 500, detail,
                       error="Cancelled" if task["status"] == "cancelled" else "TaskFailed")
    stored = json.loads(room().outputs.get(task["result_key"]))
    return json_response(stored["body"], stored["status"])


@bp.delete("/sdapi/v2/tasks/<task_id>")
def cancel_task(task_id: str):
    task = _own_task(task_id)
    r = room()
    if task["status"] in ("queued", "running"):
        r.store.cancel(task_id)
        r.runner.interrupt_local(task_id)
        task = r.store.get(task_id)
    return json_response(task_view(task))


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not low <= int(raw) <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return int(raw)


@status_bp.get("/sdapi/v2/tasks")
def list_tasks():
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        raise ApiError(400, f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    page = _int_arg("page", 1, 1, 1_000_000)
    page_size = _int_arg("page_size", 20, 1, MAX_PAGE_SIZE)
    user = caller()
    result = room().store.list(None if is_admin(user) else user, status, page, page_size)
    return json_response({"tasks": [task_view(t) for t in result.rows], "total": result.total, "page": page,
                          "page_size": page_size})


# A1111 1.10's internal job routes (modules/progress.py), answered from the store.
@status_bp.post("/internal/progress")
def internal_progress():
    from ..api.routes import body_json

    body = body_json()
    task_id = body.get("id_task") if isinstance(body, dict) else None
    if not isinstance(task_id, str):
        raise ApiError(422, "id_task must be a string")
    known = body.get("id_live_preview", -1)
    if isinstance(known, bool) or not isinstance(known, int):
        raise ApiError(422, "id_live_preview must be an integer")
    r = room()
    r.store.reap()
    task = r.store.get(task_id) if TASK_ID.fullmatch(task_id) else None
    user = caller()
    if task is not None and task["user"] != user and not is_admin(user):
        task = None
    status = task["status"] if task else None
    active, queued, completed = status == "running", status == "queued", status in ("succeeded", "failed",
                                                                                      "cancelled")
    if not active:
        textinfo = "Waiting..."
        if queued:
            queued_total = r.store.list(None, "queued", 1, 1).total
            textinfo = f"In queue: {r.store.queue_position(task) + 1}/{queued_total}"
        return json_response({"active": False, "queued": queued, "completed": completed, "progress": None,
                              "eta": None, "live_preview": None, "id_live_preview": -1, "textinfo": textinfo})
    # The live preview travels only when it is newer than the one the client says it has (A1111's protocol).
    live_preview, preview_id = None, preview_step(task["preview_key"])
    if preview_id is not None and preview_id != known and body.get("live_preview", True) is not False:
        try:
            png = r.outputs.get(task["preview_key"])
            live_preview = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        except (OSError, ValueError):  # replaced by a newer one meanwhile: the next poll gets that
            preview_id = known
    return json_response({"active": True, "queued": False, "completed": False,
                          "progress": float(task["progress"] or 0.0), "eta": task["eta"], "live_preview": live_preview,
                          "id_live_preview": preview_id if preview_id is not None else known, "textinfo": None})


@status_bp.get("/internal/pending-tasks")
def internal_pending_tasks():
    user = caller()
    ids = room().store.pending_ids(None if is_admin(user) else user)
    return json_response({"size": len(ids), "tasks": ids})
