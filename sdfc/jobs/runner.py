"""Run one claimed task on this instance: the v1 generation, with progress, lease and cancel through the store.

A keep-alive thread writes the job's progress and extends its lease every `heartbeat_s` (so progress writes are
rate-limited however fast the sampler steps), and turns a cancel flag set by any instance into an interrupt.
The result file holds `{"status", "body"}`: exactly what the v1 route would have answered.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid

from ..api.errors import ApiError, error_body
from ..api.preview import preview_png
from ..api.queue import QueueClosed
from ..engine import JobControl
from ..pricing import Pricing
from ..records.outputs import OutputsStore
from .store import TaskStore

log = logging.getLogger("sdfc.jobs")
CANCEL_POLL_S = 0.05  # one indexed read of one row: cheap next to a UNet step on any device
PREVIEW_EVERY_S = 1.0  # a small PNG to the outputs store (NAS in FC): A1111's default pace for previews


def task_folder(task_id: str) -> str:
    """Outputs-store folder of a task: task ids may hold characters keys may not (A1111's `task(…)`)."""
    return "tasks/" + hashlib.sha256(task_id.encode("utf-8")).hexdigest()[:40]


def new_payload_key(task_id: str) -> str:
    """A fresh key per submission: a submit that loses to an existing task id cannot touch that task's request."""
    return f"{task_folder(task_id)}/request-{uuid.uuid4().hex[:16]}.json"


def preview_key(task_id: str, step: int) -> str:
    return f"{task_folder(task_id)}/preview-{int(step)}.png"


def preview_step(key: str | None) -> int | None:
    """The step a preview key was stored at (its id for /internal/progress)."""
    try:
        return int(key.rsplit("-", 1)[1].split(".", 1)[0]) if key else None
    except (IndexError, ValueError):
        return None


def result_key(task_id: str) -> str:
    return task_folder(task_id) + "/result.json"


class TaskControl(JobControl):
    """A job's control that tells a user's cancel from other interrupts (a drain at shutdown), and keeps the
    last step sampled (the engine reports every step done once a job ends, interrupted or not)."""
    cancel_seen: bool = False
    last_step: int = 0
    loss: float | None = None  # a training task's last loss

    def cancel(self) -> None:
        self.cancel_seen = True
        self.interrupt()

    def _step(self, step: int, latent) -> None:
        super()._step(step, latent)
        self.last_step = step

    def report_training(self, step: int, steps: int, loss: float | None) -> None:
        """A training task's progress: its optimiser steps as the job's steps, and the loss."""
        self.job_count, self.sampling_steps, self.loss = 1, steps, loss
        self._step(step, None)


class TaskRunner:
    def __init__(self, api_state, store: TaskStore, outputs: OutputsStore, instance: str, pricing: Pricing,
                 lease_s: float = 30.0, heartbeat_s: float = 0.25):
        self.api, self.store, self.outputs, self.instance = api_state, store, outputs, instance
        self.pricing, self.lease_s, self.heartbeat_s = pricing, lease_s, heartbeat_s
        self._controls: dict[str, JobControl] = {}  # tasks running here: a local cancel interrupts at once
        self._lock = threading.Lock()

    def interrupt_local(self, task_id: str) -> bool:
        """A cancel that reached the instance running the task: stop at the next step, not the next beat."""
        with self._lock:
            control = self._controls.get(task_id)
        if control is not None:
            control.cancel()
        return control is not None

    def run(self, task: dict) -> str:
        """Execute a task this instance has claimed; its final status."""
        from ..api.generation import run_generation  # the api room's translation, shared with v1

        task_id = task["id"]
        control = TaskControl()
        with self._lock:
            self._controls[task_id] = control
        stop = threading.Event()
        keepalive = threading.Thread(target=self._keep_alive, args=(task_id, control, stop),
                                     name=f"sdfc-task-{task_id[:12]}", daemon=True)
        started = time.perf_counter()
        keepalive.start()
        try:
            values = json.loads(self.outputs.get(task["payload_key"]))
            with self.api.track():  # a drain waits for tasks as for requests
                if task["type"].startswith("train-"):  # LoRA and embedding training, in a child process
                    from .training_process import run_training_task
                    body = run_training_task(self.api, values, control, task["type"])
                else:
                    body = run_generation(self.api, values, task["type"], request_id=task_id, control=control,
                                          user=task["user"] or "", task_id=task_id)
            # A user's cancel keeps what A1111's interrupt returns (the image so far); so does /interrupt.
            status, outcome, error = 200, ("cancelled" if control.cancel_seen else "succeeded"), None
            if control.interrupted and not control.cancel_seen and self.api.draining:
                error = "interrupted: the instance running this task shut down before it finished"
                status, outcome = 503, "failed"
                body = error_body("ServiceUnavailable", error)
        except QueueClosed:
            # Shutting down before it started: another instance (or this one, restarted) takes it.
            self.store.release(task_id, self.instance)
            return "queued"
        except ApiError as exc:
            body = error_body(exc.error, exc.detail, exc.errors)
            status, outcome, error = exc.status, "failed", exc.detail
        except Exception:  # noqa: BLE001 - a task must end in a final state, whatever went wrong
            log.exception("task %s failed", task_id)
            body = error_body("InternalError", f"internal error while running task {task_id}")
            status, outcome, error = 500, "failed", body["detail"]
        finally:
            stop.set()
            keepalive.join()
            with self._lock:
                self._controls.pop(task_id, None)
        seconds = round(time.perf_counter() - started, 3)
        key = result_key(task_id)
        self.outputs.put(key, json.dumps({"status": status, "body": body}).encode("utf-8"))
        if not self.store.finish(task_id, self.instance, outcome, result_key=key, error=error,
                                 gpu_seconds=seconds, cost=self.pricing.cost(seconds), step=control.last_step,
                                 steps=control.sampling_steps or None, loss=control.loss):
            log.warning("task %s was taken from this instance (lease expired) before it finished", task_id)
        return outcome

    def _keep_alive(self, task_id: str, control: TaskControl, stop: threading.Event) -> None:
        """Off the sampling thread, so that a slow database never slows the job: the cancel flag is read
        every CANCEL_POLL_S (a cancel lands within a step of the sampler's pace), progress is written and the
        lease extended every heartbeat_s, and a live preview is stored at most every PREVIEW_EVERY_S."""
        began = last_beat = time.monotonic()
        last_preview, preview = began, None
        poll = min(CANCEL_POLL_S, self.heartbeat_s)
        while not stop.wait(poll):
            try:
                now = time.monotonic()
                if now - last_beat >= self.heartbeat_s:
                    last_beat = now
                    done = control.progress
                    eta = (now - began) / done - (now - began) if done > 0 else None
                    fresh = None
                    if now - last_preview >= PREVIEW_EVERY_S and self.api.options.snapshot()["live_previews_enable"]:
                        last_preview = now
                        fresh = self._store_preview(task_id, control, preview)
                        preview = fresh or preview
                    cancelled = self.store.heartbeat(task_id, self.instance, self.lease_s, control.last_step,
                                                     control.sampling_steps, done, eta, preview_key=fresh,
                                                     loss=control.loss)
                else:
                    cancelled = self.store.cancel_requested(task_id)
                if cancelled:
                    control.cancel()
            except Exception:  # noqa: BLE001 - a database blip must not kill the job; the lease covers it
                log.warning("task %s: heartbeat failed", task_id, exc_info=True)

    def _store_preview(self, task_id: str, control: TaskControl, previous: str | None) -> str | None:
        """The job's current latent as a preview PNG keyed by its step (the step is the preview's id for
        /internal/progress); the previous one is removed. None when there is nothing new."""
        step, png = control.last_step, preview_png(control.current_latent, control.preview_factors)
        key = preview_key(task_id, step)
        if png is None or key == previous:
            return None
        self.outputs.put(key, png)
        if previous:
            self.outputs.path(previous).unlink(missing_ok=True)
        return key
