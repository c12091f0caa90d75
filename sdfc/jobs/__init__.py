"""Jobs that outlive the request and the instance: the task store, the task API, execution and leases.

The room reads and writes only through the records database connection (`generation_tasks` beside
`generated_images`) and the outputs store (request and result bodies by key); it reaches the engine only through
the API room's `run_generation`, under the same FIFO lock as v1 requests.
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..api.errors import ApiError
from ..config import ConfigError
from ..records.events import RecordRejected
from ..records.outputs import OutputsStore
from ..records.store import RecordStore
from ..pricing import Pricing
from .fc_async import FcHandOff
from .runner import TaskRunner, new_payload_key, result_key
from .store import TaskStore
from .training_requests import TRAINING_TYPES
from .worker import LocalWorker

__all__ = ["JobsRoom", "build_jobs", "TaskStore", "TaskRunner", "Pricing"]


def instance_name() -> str:
    """Who runs a task, as operators see it: FC's instance id in FC, host and pid locally."""
    return os.environ.get("FC_INSTANCE_ID") or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class JobsRoom:
    store: TaskStore               # the request-path view (bounded waits)
    outputs: OutputsStore
    runner: TaskRunner             # executes on this instance, with its own (patient) view of the store
    worker: LocalWorker | None
    admins: frozenset[str] = frozenset()
    auth_enabled: bool = True
    # How a new task reaches an executor: wake the local worker, or an FC async invocation.
    hand_off: Callable[[dict], None] = field(default=lambda task: None)

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()

    def run_inline(self, mode: str, values: dict, user: str) -> tuple[int, dict]:
        """A v1 request that names its job (`force_task_id`): run it here and now, as a task row, so that
        /internal/progress and the task API follow it from any instance. (status, body) as v1 answers."""
        from ..api.generation import validate_generation  # validation first: a bad request queues nothing

        validate_generation(self.runner.api, values, mode)
        task_id = values["force_task_id"]
        self.create_task(task_id, mode, user, values)
        if not self.runner.store.claim(task_id, self.runner.instance, self.runner.lease_s):
            raise ApiError(409, f"task {task_id!r} was taken by another instance", error="Conflict")
        self.runner.run(self.runner.store.get(task_id))
        stored = json.loads(self.outputs.get(result_key(task_id)))
        return stored["status"], stored["body"]


    def create_task(self, task_id: str, mode: str, user: str, values: dict,
                    idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Store the request, then the queued row; (task, created). A task id already taken is a 409, and the
        request stored for a submit that made no task is removed again."""
        key = new_payload_key(task_id)
        self.outputs.put(key, json.dumps(values).encode("utf-8"))
        try:
            task, created = self.store.create(task_id, mode, user, key, idempotency_key=idempotency_key)
        except RecordRejected:
            self.outputs.path(key).unlink(missing_ok=True)
            raise ApiError(409, f"task id {task_id!r} is already taken", error="Conflict") from None
        if not created:
            self.outputs.path(key).unlink(missing_ok=True)
        return task, created

    def run_handed_off(self, task_id: str) -> tuple[int, dict]:
        """An FC async invocation of this task (`POST /invoke`): run it here unless it is no longer queued.
        (status, body): a 503 when this instance is shutting down, so that FC's retry takes it elsewhere."""
        store = self.runner.store
        store.reap()
        if not store.claim(task_id, self.runner.instance, self.runner.lease_s):
            task = store.get(task_id)
            return 200, {"task_id": task_id, "ran": False, "status": task["status"] if task else None}
        outcome = self.runner.run(store.get(task_id))
        if outcome == "queued":  # given back: the instance is draining
            return 503, {"task_id": task_id, "ran": False, "status": "queued"}
        return 200, {"task_id": task_id, "ran": True, "status": outcome}


def by_type(generation: Callable[[dict], None], training: Callable[[dict], None]) -> Callable[[dict], None]:
    """A hand-off that sends train tasks one way (the training function) and generations another."""
    def hand_off(task: dict) -> None:
        (training if task["type"] in TRAINING_TYPES else generation)(task)
    return hand_off


def build_jobs(settings, records: RecordStore, outputs: OutputsStore, api_state, credentials=None) -> JobsRoom:
    """`settings.task_worker`: `local` (this process's worker runs queued tasks), `fc` (each task is an FC
    async invocation of `settings.task_function`, with the FC role `credentials`), `off` (answers only)."""
    background = TaskStore(records)
    runner = TaskRunner(api_state, background, outputs, instance_name(), settings.pricing,
                        lease_s=settings.task_lease_s, heartbeat_s=settings.task_heartbeat_s)
    if settings.task_worker not in ("local", "fc", "off"):
        raise ConfigError(f"SDFC_TASK_WORKER must be local, fc or off, got {settings.task_worker!r}")
    worker = LocalWorker(background, runner) if settings.task_worker == "local" else None
    room = JobsRoom(TaskStore(records, for_requests=True), outputs, runner, worker,
                    admins=frozenset(settings.admins), auth_enabled=bool(settings.auth))
    if worker is not None:
        def wake(task: dict) -> None:
            worker.start()
            worker.wake()
        room.hand_off = wake
    elif settings.task_worker == "fc":
        from ..dispatch import fc_endpoint
        from ..dispatch.transports import Fc3Transport
        room.hand_off = FcHandOff(Fc3Transport(settings.task_function, fc_endpoint(settings), credentials))
        if settings.training_function:  # train tasks go to the FC training function (the one image with torch)
            room.hand_off = by_type(room.hand_off, FcHandOff(Fc3Transport(settings.training_function,
                                                                          fc_endpoint(settings), credentials)))
    return room
