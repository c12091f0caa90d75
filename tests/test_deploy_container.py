"""The sd-api container's contract with FC, checked without Docker: the Dockerfile's own command runs here with
the image's ENV plus s.yaml's environment (container paths mapped into the repository, a free port), and is
driven the way FC drives it: listen at once on 0.0.0.0, POST /initialize, requests with FC's headers, event
calls on POST /invoke, GET /pre-stop while work is in flight."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from .deploy_support import ROOT, container_command, image_env, last, map_paths, props
from .fc_stub import FcStub
from .live_server import free_port

USER, PASSWORD = "alice", "Wonder-land42"  # deploy_support.PLACEHOLDER_ENV's SDFC_AUTH
STS = {"x-fc-access-key-id": "STS.placeholder-id", "x-fc-access-key-secret": "placeholder-secret",
       "x-fc-security-token": "placeholder-token"}
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 7}


def fc_headers(request_id: str, control_path: str = "/http-invoke") -> dict:
    """What FC adds to every request it forwards to a custom container (docs/fc-deploy.md §3.3); the control
    path names the call: /http-invoke for a client's request, the hook's path for FC's own calls."""
    return {"x-fc-request-id": request_id, "x-fc-function-name": "sdfc-api", "x-fc-function-memory": "32768",
            "x-fc-function-handler": "index.handler", "x-fc-region": "cn-hangzhou",
            "x-fc-account-id": "1234567890123456", "x-fc-qualifier": "LATEST", "x-fc-control-path": control_path,
            **STS}


class Container:
    """The image's CMD as a local process."""

    def __init__(self, tmp: Path, env_overrides: dict | None = None):
        self.tmp, self.port = tmp, free_port()
        self.mapping = {
            last("WORKDIR"): ROOT,                              # the code the image copies to /app
            "/opt/venv/bin": Path(sys.executable).parent,       # the image's virtual environment
            "/opt/sdfc/models": ROOT / "tests/fixtures/models",  # the baked models (MODELS_SRC)
            "/tmp/sdfc": tmp / "data",
            "/mnt/sdfc": tmp / "mnt",                           # the NAS mount
        }
        env = image_env({"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        env.update(props("sdfc-api")["environmentVariables"])
        env.update({"FC_FUNCTION_NAME": "sdfc-api", "FC_REGION": "cn-hangzhou", "FC_ACCOUNT_ID": "1234567890123456",
                    "FC_INSTANCE_ID": "local-test", "HOME": str(tmp)})
        env = {k: map_paths(v, self.mapping) for k, v in env.items()}
        env.update({"SDFC_PORT": str(self.port)}, **(env_overrides or {}))
        self.env = env
        self.log_path = tmp / f"container-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()
        self.process = subprocess.Popen(container_command(), cwd=self.mapping[last("WORKDIR")], env=env,
                                        stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def first_answer(self, limit: float) -> float:
        """Seconds from start until any HTTP answer."""
        while time.monotonic() - self.started < limit:
            if self.process.poll() is not None:
                raise AssertionError(f"the container's command exited with {self.process.returncode}:\n{self.log()}")
            try:
                requests.get(self.url + "/sdapi/v1/options", timeout=(0.5, limit))
                return time.monotonic() - self.started
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.02)
        raise AssertionError(f"no answer within {limit} s:\n{self.log()}")

    def request_lines(self) -> list[dict]:
        return [json.loads(m.group(1)) for m in re.finditer(r"sdfc\.access: (\{.*\})$", self.log(), re.MULTILINE)]

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # what FC sends when it stops the instance
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def listening_on_all_interfaces(port: int) -> bool:
    """A LISTEN socket on 0.0.0.0:port (IPv4, as FC's network reaches the container) in /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if local == f"00000000:{port:04X}" and state == "0A":
            return True
    return False


def records_stub() -> FcStub:
    """FC's API on loopback, with the records function collecting the events it receives."""
    received = []
    records_function = props("sdfc-api")["environmentVariables"]["SDFC_RECORDS_FUNCTION"]
    fc = FcStub({records_function: lambda body, context: received.append(json.loads(body))},
                access_key_id=STS["x-fc-access-key-id"], security_token=STS["x-fc-security-token"]).start()
    fc.received = received
    return fc


def start_container(tmp: Path, stub: FcStub) -> Container:
    """The image's command with the deployed environment. The only departures: a free port, the stub's address
    for FC's API, no CUDA requirement (this machine has no GPU; onnxruntime falls back to the CPU and says so),
    and RDS as SQLite (the tasks' table; records go through the stub), so nothing leaves the machine."""
    box = Container(tmp, {"SDFC_FC_ENDPOINT": stub.url, "SDFC_REQUIRE_CUDA": "0",
                          "SDFC_DATABASE_URL": f"sqlite:///{tmp / 'rds.db'}"})
    box.answered_after = box.first_answer(limit=10)
    return box


@pytest.fixture(scope="module")
def stub():
    fc = records_stub()
    yield fc
    fc.stop()


@pytest.fixture(scope="module")
def container(tmp_path_factory, stub):
    box = start_container(tmp_path_factory.mktemp("container"), stub)
    yield box
    assert box.stop() == 0, box.log()


def test_the_command_listens_on_all_interfaces_within_2_seconds(container):
    assert container.answered_after < 2.0, f"first answer after {container.answered_after:.2f} s"
    assert listening_on_all_interfaces(container.port)
    assert container_command()[0] == "python" and container.env["SDFC_DEVICE"] == "cuda"


def test_initialize_loads_and_warms_the_model(container):
    request_id = f"init-{uuid.uuid4().hex}"
    r = requests.post(container.url + "/initialize", headers=fc_headers(request_id, "/initialize"), timeout=120)
    assert r.status_code == 200, r.text
    report = r.json()
    # s.yaml's warm-up size, each at both UNet batches (CFG 7: cond + uncond; CFG 1: cond only).
    assert report["model"].startswith("tiny-sd [") and list(report["warmup_sizes"]) == ["512x512"]
    assert report["providers"] == ["CPUExecutionProvider"]  # CUDA was asked for; there is none here
    assert any(line["request_id"] == request_id and line["route"] == "/initialize" and line["status"] == 200
               for line in container.request_lines())
    again = requests.post(container.url + "/initialize", headers=fc_headers("init-again", "/initialize"), timeout=10)
    assert again.status_code == 200 and again.json() == report  # idempotent: no second load


def test_txt2img_with_fc_headers_logs_the_request_id_and_dispatches_the_record(container, stub):
    request_id, prompt = f"req-{uuid.uuid4().hex}", f"a lighthouse {uuid.uuid4().hex}"
    r = requests.post(container.url + "/sdapi/v1/txt2img", json={**SMALL, "prompt": prompt}, auth=(USER, PASSWORD),
                      headers=fc_headers(request_id), timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1 and r.headers["X-Request-Id"] == request_id
    line = next(line for line in container.request_lines() if line["request_id"] == request_id)
    assert line["route"] == "/sdapi/v1/txt2img" and line["status"] == 200
    # The record went to the records function by asynchronous InvokeFunction, with the role's credentials
    # from FC's headers; the image itself went to the NAS mount, by key.
    deadline = time.monotonic() + 20
    while not [e for e in stub.received if e.get("prompt") == prompt] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [i.mode for i in stub.accepted("Async")], container.log()
    event = next(e for e in stub.received if e.get("prompt") == prompt)
    # The record has its own key (FC's request id only correlates the logs); its image is on the NAS mount.
    assert event["request_id"] != request_id
    assert (container.tmp / "mnt" / "outputs" / event["image_key"]).is_file()


def test_txt2img_without_credentials_is_refused(container):
    r = requests.post(container.url + "/sdapi/v1/txt2img", json=SMALL, headers=fc_headers("anon"), timeout=30)
    assert r.status_code == 401


def test_invoke_serves_an_event_call(container):
    request_id = f"evt-{uuid.uuid4().hex}"
    event = {"rawPath": "/sdapi/v1/txt2img", "requestContext": {"http": {"method": "POST"}},
             "headers": {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
             "body": json.dumps(SMALL)}
    # InvokeFunction's payload arrives as POST /invoke with an octet-stream body (docs/fc-deploy.md §3.3).
    r = requests.post(container.url + "/invoke", data=json.dumps(event).encode(), timeout=120,
                      headers={**fc_headers(request_id, "/invoke"), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and "x-fc-status" not in r.headers
    result = r.json()
    assert result["statusCode"] == 200 and not result["isBase64Encoded"]
    assert len(json.loads(result["body"])["images"]) == 1
    routes = {line["route"] for line in container.request_lines() if line["request_id"] == request_id}
    assert routes == {"/invoke", "/sdapi/v1/txt2img"}


def test_pre_stop_returns_once_in_flight_work_is_done(container):
    done = {}

    def slow_generation():
        r = requests.post(container.url + "/sdapi/v1/txt2img", json={**SMALL, "steps": 40},
                          auth=(USER, PASSWORD), headers=fc_headers("slow"), timeout=120)
        done["status"], done["at"] = r.status_code, time.monotonic()

    worker = threading.Thread(target=slow_generation)
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the job holds the engine
        progress = requests.get(container.url + "/sdapi/v1/progress", auth=(USER, PASSWORD), timeout=10).json()
        if progress["state"]["job_count"] > 0 and progress["state"]["sampling_step"] > 0:
            break
        time.sleep(0.02)
    r = requests.get(container.url + "/pre-stop", headers=fc_headers("pre-stop", "/pre-stop"), timeout=100)
    finished = time.monotonic()
    worker.join(60)
    assert done.get("status") == 200
    assert r.status_code == 200 and r.json() == {"drained": True, "in_flight": 0}
    assert finished >= done["at"], "pre-stop answered while the generation was still running"


def test_the_command_refuses_to_start_without_strong_credentials(tmp_path):
    box = Container(tmp_path, {"SDFC_AUTH": "alice:weak"})
    try:
        box.process.wait(30)
    finally:
        box.stop()
    assert box.process.returncode != 0
    assert "password of user 'alice'" in box.log()
