"""The FC async path of the task API, end to end: the sd-api container's command (FC's environment) hands a
submitted task to FC's async queue through the real FC 3.0 SDK, against the loopback stub of FC's API; the stub
delivers it to the container's POST /invoke as FC does (x-fc-control-path: /invoke), and the task runs there."""
from __future__ import annotations

import json
import time
import uuid

import pytest
import requests

from .fc_stub import FcStub
from .test_deploy_container import PASSWORD, SMALL, STS, USER, fc_headers, start_container


@pytest.fixture
def fc_and_container(tmp_path):
    box_ref = {}

    def sd_api(body: bytes, context):
        # FC's delivery of an async invocation to a custom container: POST /invoke with its own headers.
        r = requests.post(box_ref["box"].url + "/invoke", data=body,
                          headers={**fc_headers(context.request_id, "/invoke"),
                                   "content-type": "application/octet-stream"}, timeout=120)
        if r.status_code >= 400 or r.headers.get("x-fc-status"):
            raise RuntimeError(f"invocation failed: {r.status_code} {r.text[:200]}")
        return r.content

    stub = FcStub({"sdfc-api": sd_api, "sdfc-records": lambda body, context: None},
                  access_key_id=STS["x-fc-access-key-id"], security_token=STS["x-fc-security-token"]).start()
    box = box_ref["box"] = start_container(tmp_path, stub)
    yield stub, box
    box.stop()
    stub.stop()


def test_a_task_travels_through_fc_async_invocation(fc_and_container):
    stub, box = fc_and_container
    client = dict(auth=(USER, PASSWORD), timeout=30)
    submit = requests.post(box.url + "/sdapi/v2/tasks/txt2img", json=SMALL,
                           headers=fc_headers(uuid.uuid4().hex), **client)
    assert submit.status_code == 202, submit.text
    task_id = submit.json()["task_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        task = requests.get(f"{box.url}/sdapi/v2/tasks/{task_id}", headers=fc_headers(uuid.uuid4().hex),
                            **client).json()
        if task["status"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert task["status"] == "succeeded", (task, box.log()[-3000:])
    assert task["gpu_seconds"] > 0 and task["cost"] > 0
    calls = [i for i in stub.accepted("Async") if i.function == "sdfc-api"]
    assert len(calls) == 1
    call = calls[0]
    assert call.headers["x-fc-async-task-id"] == task_id  # FC can name, query and stop it by the task's id
    assert json.loads(call.body) == {"sdfc_task": task_id}  # the request itself waits in the outputs store
    assert call.headers["authorization"].startswith("ACS3-HMAC-SHA256 ")  # the role's STS credentials
    result = requests.get(f"{box.url}/sdapi/v2/tasks/{task_id}/result", headers=fc_headers(uuid.uuid4().hex),
                          **client)
    assert result.status_code == 200 and len(result.json()["images"]) == 1
    # FC's retry of an invocation that already ran does nothing.
    again = requests.post(box.url + "/invoke", data=call.body, headers=fc_headers("retry-1", "/invoke"),
                          timeout=30)
    assert again.status_code == 200 and again.json() == {"task_id": task_id, "ran": False, "status": "succeeded"}
    # A client cannot run tasks: /invoke is FC's alone.
    forged = requests.post(box.url + "/invoke", data=call.body, headers=fc_headers("forged", "/http-invoke"),
                           timeout=30)
    assert forged.status_code == 404
