"""The FC hand-off: a submitted task becomes an asynchronous invocation of the sd-api function itself.

FC's async queue then does the queueing and the scale-out (we write no scheduler): whichever instance FC picks
receives the event on `POST /invoke` (an FC-only hook, sdfc/fc/lifecycle.py) and runs the task there. The event
carries only the task id (FC caps async bodies at 128 KB; the request is in the outputs store). A failed run
answers with `x-fc-status`, so FC's retries and its on-failure destination apply; a retry of a task that already
ran, or was cancelled, does nothing.
"""
from __future__ import annotations

import hashlib
import json
import re

EVENT_KEY = "sdfc_task"
# FC's rule for x-fc-async-task-id: a letter or underscore, then letters, digits, _ or -, at most 128.
ASYNC_TASK_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")


def async_task_id(task_id: str) -> str:
    """FC's id for the invocation: the task id itself where FC allows it (sdfc's own are), else a digest."""
    if ASYNC_TASK_ID.fullmatch(task_id):
        return task_id
    return "sdfc_" + hashlib.sha256(task_id.encode("utf-8")).hexdigest()[:40]


def task_event(task_id: str) -> bytes:
    return json.dumps({EVENT_KEY: task_id}).encode("utf-8")


def task_of_event(body: bytes) -> str | None:
    """The task id when `body` is a task event, else None (an HTTP event, handled as before)."""
    try:
        event = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(event, dict) and set(event) == {EVENT_KEY} and isinstance(event[EVENT_KEY], str):
        return event[EVENT_KEY]
    return None


class FcHandOff:
    """Deliver a task to FC's async queue through the FC 3.0 SDK (the records dispatch's transport)."""

    def __init__(self, transport):
        self.transport = transport

    def __call__(self, task: dict) -> None:
        self.transport.deliver(task_event(task["id"]), async_task_id=async_task_id(task["id"]))
