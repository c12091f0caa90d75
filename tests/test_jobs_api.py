"""The task API over real sockets: submit to one server process, poll and fetch from another sharing the
database and the outputs folder; cancel; a server killed mid-task; A1111's /internal/progress; users."""
from __future__ import annotations

import base64
import json
import signal
import socket
import threading
import time

import pytest
import requests

from .live_server import AUTH, PASSWORD, SECOND_PASSWORD, SECOND_USER, USER, start_server

ALICE = (USER, PASSWORD)
BOB = (SECOND_USER, SECOND_PASSWORD)
SMALL = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "steps": 4, "width": 64, "height": 64,
         "seed": 1234, "subseed": 99, "sampler_name": "Euler a", "cfg_scale": 6.0}
# Long enough on the tiny model to be caught running (about a second or more per step on a loaded machine).
LONG = {**SMALL, "steps": 60, "width": 256, "height": 256}


def shared_env(tmp, name: str, **extra) -> dict:
    """Two processes share the database and outputs; each keeps its own records spool."""
    env = {"SDFC_DATABASE_URL": f"sqlite:///{tmp / 'shared.db'}", "SDFC_OUTPUTS_DIR": str(tmp / "outputs"),
           "SDFC_SPOOL_DIR": str(tmp / f"spool-{name}"), "SDFC_ADMINS": "carol"}
    env.update(extra)
    return env


@pytest.fixture
def pair(tmp_path):
    """Server A runs tasks; server B only answers (no worker), as FC's web function would."""
    a = start_server(tmp_path, env=shared_env(tmp_path, "a"))
    b = start_server(tmp_path, env=shared_env(tmp_path, "b", SDFC_TASK_WORKER="off"))
    yield a, b
    a.stop()
    b.stop()


def submit_and_hang_up(server, path: str, body: dict, auth=ALICE, headers: dict | None = None) -> dict:
    """POST over a raw socket, read the 202, and close at once: the submitting client goes away."""
    payload = json.dumps(body).encode()
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {token}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n{extra}"
                   "Connection: close\r\n\r\n").encode() + payload)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body_bytes = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"202", data[:500]
    return json.loads(body_bytes)


def wait_status(server, task_id: str, wanted: set[str], auth=ALICE, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = requests.get(f"{server.url}/sdapi/v2/tasks/{task_id}", auth=auth, timeout=10).json()
        if task["status"] in wanted:
            return task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} still {task['status']} after {timeout} s")


def wait_running(server, task_id: str, min_step: int = 1, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = requests.get(f"{server.url}/sdapi/v2/tasks/{task_id}", auth=ALICE, timeout=10).json()
        if task["status"] == "running" and task["step"] >= min_step:
            return task
        assert task["status"] in ("queued", "running"), task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached step {min_step}")


def test_submit_on_one_process_result_from_another_equals_v1(pair):
    a, b = pair
    accepted = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", SMALL)
    assert accepted["status"] == "queued" and accepted["task_id"]
    task = wait_status(b, accepted["task_id"], {"succeeded", "failed"})
    assert task["status"] == "succeeded", task
    assert task["user"] == USER and task["type"] == "txt2img" and task["progress"] == 1
    assert task["step"] == task["steps"] == SMALL["steps"]
    assert task["gpu_seconds"] > 0 and task["cost"] == pytest.approx(task["gpu_seconds"] * 84.8 * 0.00002,
                                                                     rel=1e-3)
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    result = requests.get(f"{b.url}/sdapi/v2/tasks/{accepted['task_id']}/result", auth=ALICE, timeout=10)
    assert result.status_code == 200
    v1 = requests.post(f"{a.url}/sdapi/v1/txt2img", json=SMALL, auth=ALICE, timeout=120)
    assert v1.status_code == 200
    got, want = result.json(), v1.json()
    assert set(got) == {"images", "parameters", "info"}
    assert got["parameters"] == want["parameters"]
    assert [base64.b64decode(i) for i in got["images"]] == [base64.b64decode(i) for i in want["images"]]
    info, want_info = json.loads(got["info"]), json.loads(want["info"])
    info.pop("job_timestamp"), want_info.pop("job_timestamp")
    assert info == want_info


def test_idempotency_key_returns_the_same_task(pair):
    a, b = pair
    first = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", SMALL, headers={"Idempotency-Key": "abc-1"})
    again = submit_and_hang_up(b, "/sdapi/v2/tasks/txt2img", SMALL, headers={"Idempotency-Key": "abc-1"})
    assert again["task_id"] == first["task_id"]
    other = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", SMALL, auth=BOB, headers={"Idempotency-Key": "abc-1"})
    assert other["task_id"] != first["task_id"]


def test_validation_happens_before_anything_is_queued(pair):
    a, _ = pair
    bad = requests.post(f"{a.url}/sdapi/v2/tasks/txt2img", json={**SMALL, "sampler_name": "nope"}, auth=ALICE,
                        timeout=10)
    assert bad.status_code == 400 and "sampler" in bad.json()["detail"].lower()
    typed = requests.post(f"{a.url}/sdapi/v2/tasks/txt2img", json={**SMALL, "steps": "many"}, auth=ALICE,
                          timeout=10)
    assert typed.status_code == 422 and "detail" in typed.json()
    no_image = requests.post(f"{a.url}/sdapi/v2/tasks/img2img", json=SMALL, auth=ALICE, timeout=10)
    assert no_image.status_code == 404
    listing = requests.get(f"{a.url}/sdapi/v2/tasks", auth=ALICE, timeout=10).json()
    assert listing["total"] == 0
    anonymous = requests.post(f"{a.url}/sdapi/v2/tasks/txt2img", json=SMALL, timeout=10)
    assert anonymous.status_code == 401


def test_cancel_queued_never_runs_and_running_stops(tmp_path):
    # Progress every 50 ms, so that the step seen at the cancel is at most one (512² UNet) step old.
    a = start_server(tmp_path, env=shared_env(tmp_path, "a", SDFC_TASK_HEARTBEAT_S="0.05"))
    b = start_server(tmp_path, env=shared_env(tmp_path, "b", SDFC_TASK_WORKER="off"))
    try:
        _cancel_queued_and_running(a, b)
    finally:
        a.stop()
        b.stop()


def _cancel_queued_and_running(a, b):
    running = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", {**LONG, "width": 512, "height": 512,
                                                               "steps": 30})["task_id"]
    queued = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", SMALL)["task_id"]
    wait_running(b, running, min_step=1)
    cancelled = requests.delete(f"{b.url}/sdapi/v2/tasks/{queued}", auth=ALICE, timeout=10).json()
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    # Cancelled from the other process: the running instance sees the flag in the store.
    at = requests.delete(f"{b.url}/sdapi/v2/tasks/{running}", auth=ALICE, timeout=10).json()
    step_at_cancel = at["step"]
    done = wait_status(b, running, {"cancelled", "succeeded", "failed"}, timeout=60)
    assert done["status"] == "cancelled"
    # One step for the staleness of the step seen, one for the cancel to land.
    assert done["step"] <= step_at_cancel + 2 < 30, (step_at_cancel, done)
    result = requests.get(f"{b.url}/sdapi/v2/tasks/{running}/result", auth=ALICE, timeout=10)
    assert result.status_code == 200 and len(result.json()["images"]) == 1  # as A1111's interrupt: an image
    time.sleep(1.5)
    never = requests.get(f"{b.url}/sdapi/v2/tasks/{queued}", auth=ALICE, timeout=10).json()
    assert never["status"] == "cancelled" and never["started_at"] is None
    gone = requests.get(f"{b.url}/sdapi/v2/tasks/{queued}/result", auth=ALICE, timeout=10)
    assert gone.status_code == 410


def test_users_see_only_their_own_tasks(pair):
    a, b = pair
    mine = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", SMALL)["task_id"]
    wait_status(b, mine, {"succeeded"})
    for method, path in (("get", ""), ("get", "/result"), ("delete", "")):
        r = requests.request(method, f"{b.url}/sdapi/v2/tasks/{mine}{path}", auth=BOB, timeout=10)
        assert r.status_code == 404, (method, path, r.text)
    assert requests.get(f"{b.url}/sdapi/v2/tasks", auth=BOB, timeout=10).json()["total"] == 0
    assert requests.get(f"{b.url}/sdapi/v2/tasks", auth=ALICE, timeout=10).json()["total"] == 1


def test_admins_see_everyone(tmp_path):
    env = shared_env(tmp_path, "x", SDFC_AUTH=AUTH + ",carol:Adm1n-carol")
    server = start_server(tmp_path, env=env)
    try:
        task = submit_and_hang_up(server, "/sdapi/v2/tasks/txt2img", SMALL)["task_id"]
        admin = ("carol", "Adm1n-carol")
        assert requests.get(f"{server.url}/sdapi/v2/tasks/{task}", auth=admin, timeout=10).status_code == 200
        assert requests.get(f"{server.url}/sdapi/v2/tasks", auth=admin, timeout=10).json()["total"] == 1
        assert requests.get(f"{server.url}/sdapi/v2/tasks", auth=BOB, timeout=10).json()["total"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize("path, status", [
    ("/sdapi/v2/tasks/%00bad", 404), ("/sdapi/v2/tasks/" + "x" * 300, 404),
    ("/sdapi/v2/tasks?status=bogus", 400), ("/sdapi/v2/tasks?page=0", 400), ("/sdapi/v2/tasks?page=-1", 400),
    ("/sdapi/v2/tasks?page_size=100000", 400), ("/sdapi/v2/tasks?page=99999999999999999999", 400),
    ("/sdapi/v2/tasks/unknown-task/result", 404),
])
def test_bad_ids_pages_and_statuses(pair, path, status):
    a, _ = pair
    r = requests.get(a.url + path, auth=ALICE, timeout=10)
    assert r.status_code == status, r.text
    assert set(r.json()) >= {"error", "detail"}


def test_killed_server_task_fails_after_its_lease(tmp_path):
    a = start_server(tmp_path, env=shared_env(tmp_path, "a", SDFC_TASK_LEASE_S="2"))
    b = start_server(tmp_path, env=shared_env(tmp_path, "b", SDFC_TASK_WORKER="off"))
    try:
        task_id = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", LONG)["task_id"]
        wait_running(b, task_id, min_step=1)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(10)
        failed = wait_status(b, task_id, {"failed", "succeeded", "cancelled"}, timeout=30)
        assert failed["status"] == "failed" and "lease expired" in failed["error"], failed
        assert requests.get(f"{b.url}/sdapi/v2/tasks?status=running", auth=ALICE, timeout=10).json()["total"] == 0
        result = requests.get(f"{b.url}/sdapi/v2/tasks/{task_id}/result", auth=ALICE, timeout=10)
        assert result.status_code == 500 and "lease expired" in result.json()["detail"]
    finally:
        a.stop()
        b.stop()


def test_internal_progress_follows_a_forced_task_id(pair):
    a, b = pair
    blocker = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", {**LONG, "steps": 20})["task_id"]
    forced = "task(sdfc-progress-1)"
    submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", {**LONG, "steps": 60, "force_task_id": forced})
    seen, progress, previews = [], [], []
    preview_id = -1
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = requests.post(f"{b.url}/internal/progress", json={"id_task": forced, "id_live_preview": preview_id},
                          auth=ALICE, timeout=10).json()
        if r["live_preview"]:
            assert r["live_preview"].startswith("data:image/png;base64,") and r["id_live_preview"] != preview_id
            previews.append(r["id_live_preview"])
            # The same id sent back: no image until there is a newer one (A1111's protocol).
            again = requests.post(f"{b.url}/internal/progress",
                                  json={"id_task": forced, "id_live_preview": r["id_live_preview"]},
                                  auth=ALICE, timeout=10).json()
            assert again["live_preview"] is None or again["id_live_preview"] != r["id_live_preview"]
            preview_id = r["id_live_preview"]
        state = "completed" if r["completed"] else "active" if r["active"] else "queued" if r["queued"] else "?"
        if not seen or seen[-1] != state:
            seen.append(state)
        if r["active"] and r["progress"] is not None:
            progress.append(r["progress"])
        if r["completed"]:
            break
        if state == "queued":
            assert r["textinfo"].startswith("In queue: ")
            pending = requests.get(f"{b.url}/internal/pending-tasks", auth=ALICE, timeout=10).json()
            assert pending["size"] == len(pending["tasks"])
            if forced not in pending["tasks"]:  # it may have started between the two calls
                status = requests.get(f"{b.url}/sdapi/v2/tasks/{forced}", auth=ALICE, timeout=10).json()["status"]
                assert status != "queued", pending
        time.sleep(0.1)
    assert seen == ["queued", "active", "completed"], seen
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] > progress[0]
    assert previews and previews == sorted(previews), previews  # previews by step, from another process
    unknown = requests.post(f"{b.url}/internal/progress", json={"id_task": "task(nope)"}, auth=ALICE,
                            timeout=10).json()
    assert (unknown["active"], unknown["queued"], unknown["completed"]) == (False, False, False)
    wait_status(b, blocker, {"succeeded"})


def test_v1_generation_with_force_task_id_is_followed_from_another_process(pair):
    """A1111's web UI flow: txt2img names its job, and /internal/progress (any instance) follows it."""
    a, b = pair
    forced = "task(sdfc-v1-inline)"
    answer: dict = {}

    def generate():
        answer["r"] = requests.post(f"{a.url}/sdapi/v1/txt2img", json={**LONG, "steps": 20, "force_task_id": forced},
                                    auth=ALICE, timeout=300)

    thread = threading.Thread(target=generate)
    thread.start()
    seen = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and thread.is_alive():
        r = requests.post(f"{b.url}/internal/progress", json={"id_task": forced}, auth=ALICE, timeout=10).json()
        if r["active"]:
            seen.append(r["progress"])
        time.sleep(0.05)
    thread.join(60)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
    assert seen and max(seen) > 0, seen
    done = requests.post(f"{b.url}/internal/progress", json={"id_task": forced}, auth=ALICE, timeout=10).json()
    assert done["completed"] and not done["active"]
    task = requests.get(f"{b.url}/sdapi/v2/tasks/{forced}", auth=ALICE, timeout=10).json()
    assert task["status"] == "succeeded" and task["user"] == USER
    # The same name twice is refused, as a task id is one job.
    again = requests.post(f"{a.url}/sdapi/v1/txt2img", json={**SMALL, "force_task_id": forced}, auth=ALICE,
                          timeout=60)
    assert again.status_code == 409


def test_a_taken_task_id_cannot_touch_that_task(pair):
    """Another user's submit naming a queued task's id is a 409 and leaves that task's request as it was."""
    a, b = pair
    blocker = submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", {**LONG, "steps": 20})["task_id"]
    forced = "task(sdfc-taken)"
    submit_and_hang_up(a, "/sdapi/v2/tasks/txt2img", {**SMALL, "prompt": "mine", "force_task_id": forced})
    stolen = requests.post(f"{b.url}/sdapi/v2/tasks/txt2img",
                           json={**SMALL, "prompt": "not yours", "force_task_id": forced}, auth=BOB, timeout=30)
    assert stolen.status_code == 409
    assert wait_status(b, forced, {"succeeded", "failed"})["status"] == "succeeded"
    result = requests.get(f"{b.url}/sdapi/v2/tasks/{forced}/result", auth=ALICE, timeout=10).json()
    assert result["parameters"]["prompt"] == "mine"
    wait_status(b, blocker, {"succeeded"})
