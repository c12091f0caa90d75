"""Training in FC, end to end without Docker: the sd-api container's command (s.yaml's environment) hands a
submitted train task to FC's async queue through the real FC 3.0 SDK, against the loopback stub of FC's API, and
to the training function (SDFC_TRAINING_FUNCTION), not to itself; the stub delivers it to the training image's
command (functions/train, s.yaml's sdfc-train environment) on POST /invoke as FC does, which trains in a child
process and writes the LoRA into the NAS folder sd-api reads; progress, the result and a cancel (which ends the
training child) travel through the shared task table, whichever function answers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from .deploy_support import ROOT, instructions, map_paths, props
from .fc_stub import FcStub
from .live_server import free_port
from .test_deploy_container import PASSWORD, STS, USER, fc_headers, start_container
from .test_training import make_images, training_children

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow


class TrainFunction:
    """functions/train's CMD as a local process, with s.yaml's sdfc-train environment (NAS mapped to `mnt`)."""

    def __init__(self, tmp: Path, database_url: str):
        self.port = free_port()
        command = json.loads([rest for kw, rest in instructions(ROOT / "functions/train/Dockerfile")
                              if kw == "CMD"][-1])
        env = dict(os.environ)
        env.update({k: map_paths(v, {"/mnt/sdfc": tmp / "mnt", "/tmp/sdfc": tmp / "train-data"})
                    for k, v in props("sdfc-train")["environmentVariables"].items()})
        env.update({"SDFC_PORT": str(self.port), "SDFC_DATABASE_URL": database_url, "FC_FUNCTION_NAME": "sdfc-train",
                    "FC_REGION": "cn-hangzhou", "FC_ACCOUNT_ID": "1234567890123456", "FC_INSTANCE_ID": "train-test",
                    "OMP_NUM_THREADS": "1", "SDFC_TASK_HEARTBEAT_S": "0.05"})
        self.log_path = tmp / "train-function.log"
        self.url = f"http://127.0.0.1:{self.port}"
        command[0] = sys.executable  # the image's python is its venv's; here, this one
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(self.log_path, "w"),
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                requests.get(self.url + "/", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError(f"the training function did not listen:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def functions(tmp_path, tiny_diffusers):
    training = tmp_path / "mnt" / "training"
    shutil.copytree(tiny_diffusers, training / "models" / "tiny")
    make_images(training / "images" / "checkers")
    refs = {}

    def deliver(name):
        def handler(body: bytes, context):
            # FC's delivery of an async invocation to a custom container: POST /invoke with its own headers.
            r = requests.post(refs[name].url + "/invoke", data=body, timeout=300,
                              headers={**fc_headers(context.request_id, "/invoke"),
                                       "content-type": "application/octet-stream"})
            if r.status_code >= 400 or r.headers.get("x-fc-status"):
                raise RuntimeError(f"invocation failed: {r.status_code} {r.text[:200]}")
            return r.content
        return handler

    stub = FcStub({"sdfc-api": deliver("api"), "sdfc-train": deliver("train"),
                   "sdfc-records": lambda body, context: None},
                  access_key_id=STS["x-fc-access-key-id"], security_token=STS["x-fc-security-token"]).start()
    refs["train"] = TrainFunction(tmp_path, f"sqlite:///{tmp_path / 'rds.db'}")
    refs["api"] = start_container(tmp_path, stub)
    yield stub, refs["api"], refs["train"], tmp_path / "mnt"
    refs["api"].stop()
    refs["train"].stop()
    stub.stop()


def _wait(url: str, task_id: str, until, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = requests.get(f"{url}/sdapi/v2/tasks/{task_id}", auth=(USER, PASSWORD),
                            headers=fc_headers(uuid.uuid4().hex), timeout=30).json()
        if until(task):
            return task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never got there: {task}")


def test_a_train_task_is_handed_to_the_training_function_and_cancelled_there(functions):
    stub, api, train, mnt = functions
    client = dict(auth=(USER, PASSWORD), timeout=30)
    body = {"base": "models/tiny", "images": "images/checkers", "output_name": "fclora", "steps": 6, "rank": 2,
            "learning_rate": 1e-3, "resolution": 64, "seed": 1}
    submitted = requests.post(api.url + "/sdapi/v2/tasks/train-lora", json=body,
                              headers=fc_headers(uuid.uuid4().hex), **client)
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]
    task = _wait(api.url, task_id, lambda t: t["status"] not in ("queued", "running"))
    assert task["status"] == "succeeded" and task["step"] == 6 and task["loss"] > 0, (task, train.log()[-3000:])
    (call,) = [i for i in stub.accepted("Async") if i.function in ("sdfc-api", "sdfc-train")]
    assert call.function == "sdfc-train" and json.loads(call.body) == {"sdfc_task": task_id}
    assert call.headers["x-fc-async-task-id"] == task_id
    result = requests.get(f"{api.url}/sdapi/v2/tasks/{task_id}/result", headers=fc_headers(uuid.uuid4().hex),
                          **client).json()
    assert result["file"] == "fclora.safetensors" and result["steps_done"] == 6 and not result["cancelled"]
    assert (mnt / "loras" / "fclora.safetensors").is_file()  # on the NAS folder sd-api reads (SDFC_LORA_DIR)
    assert requests.post(f"{api.url}/sdapi/v1/refresh-loras", headers=fc_headers(uuid.uuid4().hex),
                         **client).status_code == 200
    loras = requests.get(f"{api.url}/sdapi/v1/loras", headers=fc_headers(uuid.uuid4().hex), **client).json()
    assert "fclora" in [lora["name"] for lora in loras]
    # FC's retry of an invocation that already ran does nothing; a client cannot reach /invoke without FC's header
    again = requests.post(train.url + "/invoke", data=call.body, headers=fc_headers("retry-1", "/invoke"), timeout=30)
    assert again.status_code == 200 and again.json() == {"task_id": task_id, "ran": False, "status": "succeeded"}
    assert requests.post(train.url + "/invoke", data=call.body, headers=fc_headers("x", "/http-invoke"),
                         timeout=30).status_code == 404

    # a long one, cancelled through sd-api: the training function sees the flag and ends its child
    long = requests.post(api.url + "/sdapi/v2/tasks/train-lora", json={**body, "output_name": "fclong",
                                                                       "steps": 20000},
                         headers=fc_headers(uuid.uuid4().hex), **client)
    long_id = long.json()["task_id"]
    _wait(api.url, long_id, lambda t: t["status"] == "running" and t["step"] >= 2)
    (child,) = training_children(train.process.pid)
    assert training_children(api.process.pid) == []  # sd-api trains nothing itself
    cancel = requests.delete(f"{api.url}/sdapi/v2/tasks/{long_id}", headers=fc_headers(uuid.uuid4().hex), **client)
    assert cancel.status_code == 200
    task = _wait(api.url, long_id, lambda t: t["status"] not in ("queued", "running"), timeout=60)
    assert task["status"] == "cancelled" and 2 <= task["step"] < 20000, task
    child_gone = not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert child_gone and training_children(train.process.pid) == []
    assert not (mnt / "loras" / "fclong.safetensors").exists()


def test_the_training_function_asks_fc_to_retry_only_what_may_pass_on_another_try(tmp_path):
    """Its answers follow sd-api's /invoke policy (sdfc/fc/gateway.py): an event that is not a task, or names a task
    that does not exist, fails the same way every time and is not retried on a GPU."""
    import threading

    from sdfc.config import Settings
    from sdfc.training.function import build_room, make_server

    settings = Settings.from_env({"SDFC_DATA_DIR": str(tmp_path), "SDFC_DISPATCH": "off"})
    server = make_server(build_room(settings), "127.0.0.1", 0, in_fc=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/invoke"
    try:
        for event, status in ((b"not json", 400), (json.dumps({"sdfc_task": "sdfc-none"}).encode(), 404)):
            r = requests.post(url, data=event, timeout=10)
            assert r.status_code == status and "x-fc-status" not in r.headers, (r.status_code, r.headers)
    finally:
        server.shutdown()
        server.server_close()
