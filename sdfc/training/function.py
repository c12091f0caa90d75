"""The FC training function (functions/train): a GPU container with torch that runs the train tasks sd-api hands
to it by asynchronous invocation (sdfc/jobs/__init__.py: SDFC_TRAINING_FUNCTION).

FC delivers each event to the container as `POST /invoke` (x-fc-control-path: /invoke), its body
`{"sdfc_task": id}` (sdfc/jobs/fc_async.py). The task's row is in RDS and its request in the outputs store (NAS),
as sd-api wrote them: this function claims the row, runs the training in a child process with the same task
runner as sd-api (progress, loss, lease and cancel through the row), writes the LoRA or embedding into the NAS
folders sd-api reads (SDFC_LORA_DIR, SDFC_EMBEDDINGS_DIR; images and base models from SDFC_TRAINING_DIR), and
finishes the row. A retry of a task that already ran, or was cancelled, does nothing; an event for anything but
a train task is refused. `/initialize` and `/pre-stop` answer at once: nothing is loaded ahead of a task.

The server is the standard library's (one request thread per invocation): this function has no HTTP trigger,
FC is its only caller, and each call is one long run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..config import Settings
from ..dispatch.transports import ASYNC_BODY_LIMIT
from ..fc.gateway import invocation_outcome_headers, is_platform_call
from ..jobs import JobsRoom, instance_name
from ..jobs.fc_async import task_of_event
from ..jobs.runner import TaskRunner
from ..jobs.store import TaskStore
from ..jobs.training_requests import TRAINING_TYPES
from ..records import OutputsStore, open_store

log = logging.getLogger("sdfc.training")


class _Options:
    @staticmethod
    def snapshot() -> dict:
        return {"live_previews_enable": False}  # a training step has no latent to preview


class TrainingHost:
    """What the task runner and sdfc/jobs/training_process.py use of sd-api's ApiState, for a process that serves no
    images: its settings, one job at a time, no engine to refresh (sd-api instances list the new file after
    /sdapi/v1/refresh-loras or /refresh-embeddings, as A1111's do)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.queue = threading.Lock()
        self.engine = None
        self.draining = False
        self.options = _Options()

    def track(self):
        return contextlib.nullcontext()


def build_room(settings: Settings) -> JobsRoom:
    records = open_store(settings.database_url)
    outputs = OutputsStore(settings.outputs_dir)
    runner = TaskRunner(TrainingHost(settings), TaskStore(records), outputs, instance_name(), settings.pricing,
                        lease_s=settings.task_lease_s, heartbeat_s=settings.task_heartbeat_s)
    return JobsRoom(TaskStore(records, for_requests=True), outputs, runner, worker=None)


def handle_event(room: JobsRoom, body: bytes) -> tuple[int, dict]:
    """(status, body) for one invocation; a 5xx (or 429) makes FC count it failed (its retries apply)."""
    task_id = task_of_event(body)
    if task_id is None:
        return 400, {"error": "EventError", "detail": "the event is not a task event ({\"sdfc_task\": id})"}
    task = room.runner.store.get(task_id)
    if task is None:
        return 404, {"error": "NotFound", "detail": f"no task {task_id!r}"}
    if task["type"] not in TRAINING_TYPES:
        return 400, {"error": "EventError", "detail": f"task {task_id!r} is a {task['type']} task: this function "
                                                      "runs train tasks only"}
    return room.run_handed_off(task_id)


def make_server(room: JobsRoom, host: str, port: int, in_fc: bool) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.info("%s %s", self.address_string(), fmt % args)

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in invocation_outcome_headers(status).items():  # sd-api's /invoke policy
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _platform(self, path: str) -> bool:
            # In FC only FC's own calls, told by the header its gateway sets, reach these (no HTTP trigger either).
            return not in_fc or is_platform_call(dict(self.headers.items()), in_fc, path)

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            if path == "/initialize" and self._platform(path):
                return self._answer(200, {"ready": True})
            if path != "/invoke" or not self._platform(path):
                return self._answer(404, {"error": "NotFound", "detail": "not found"})
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= ASYNC_BODY_LIMIT:
                return self._answer(413, {"error": "EventError", "detail": "the event is too large"})
            try:
                status, body = handle_event(room, self.rfile.read(length))
            except Exception:  # noqa: BLE001 - the database away: FC's retry tries again later
                log.exception("training event failed")
                status, body = 503, {"error": "ServiceUnavailable", "detail": "the task store is unavailable"}
            self._answer(status, body)

        def do_GET(self):
            if self.path.split("?", 1)[0] == "/pre-stop" and self._platform("/pre-stop"):
                return self._answer(200, {"drained": True})
            self._answer(404, {"error": "NotFound", "detail": "not found"})

    return ThreadingHTTPServer((host, port), Handler)


def serve(host: str, port: int, settings: Settings | None = None) -> None:
    settings = settings or Settings.from_env()
    server = make_server(build_room(settings), host, port, settings.in_fc)
    log.info("training function listening on %s:%d (pid %d)", host, port, os.getpid())
    server.serve_forever()
