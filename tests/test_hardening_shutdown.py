"""Issue 15 #8 over a real socket: SIGTERM during a long job refuses new work at once (503 + Retry-After), lets the
running and the queued job answer (or, past the drain budget, answers cleanly), exits within the budget; and a
record left in the spool is written when the next server starts, before any request."""
from __future__ import annotations

import signal
import threading
import time

import requests

from sdfc.records import open_store

from .live_server import PASSWORD, USER, start_server

LONG = {"prompt": "a long job", "width": 256, "height": 256, "seed": 3}
SHORT = {"prompt": "a short job", "width": 64, "height": 64, "steps": 2, "seed": 4}


def post_in_thread(server, body: dict) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            r = requests.post(server.url + "/sdapi/v1/txt2img", json=body, auth=(USER, PASSWORD), timeout=120)
            result.update(status=r.status_code, body=r.json(), at=time.monotonic())
        except requests.RequestException as exc:  # reset, closed: what must not happen
            result.update(status=None, error=repr(exc), at=time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def wait_until_sampling(server, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        state = requests.get(server.url + "/sdapi/v1/progress", auth=(USER, PASSWORD), timeout=5).json()["state"]
        if state["job_count"] > 0 and state["sampling_step"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the long job did not start sampling within {limit} s:\n{server.log()}")


def assert_refused_at_once(server) -> None:
    for method, path, body in (("POST", "/sdapi/v1/txt2img", SHORT), ("GET", "/sdapi/v1/options", None)):
        started = time.monotonic()
        r = requests.request(method, server.url + path, json=body, auth=(USER, PASSWORD), timeout=5)
        assert time.monotonic() - started < 2, "a request after SIGTERM must be refused at once, not wait"
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
        assert set(r.json()) == {"error", "detail", "body", "errors"} and "shutting down" in r.json()["detail"]


def test_sigterm_lets_the_running_and_the_queued_job_answer_and_refuses_new_work(tmp_path):
    budget = 60
    server = start_server(tmp_path, env={"SDFC_DRAIN_SECONDS": str(budget)})
    try:
        running, first = post_in_thread(server, {**LONG, "steps": 20})
        wait_until_sampling(server)
        queued, second = post_in_thread(server, SHORT)
        time.sleep(0.5)  # the short job waits behind the long one
        assert "status" not in first and "status" not in second
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        assert_refused_at_once(server)
        assert "status" not in first, "the long job should still be running when the refusals are checked"
        running.join(budget), queued.join(budget)
        assert first["status"] == 200 and len(first["body"]["images"]) == 1, first
        assert second["status"] == 200 and len(second["body"]["images"]) == 1, second
        assert second["at"] >= first["at"]  # still in arrival order
        server.process.wait(budget)
        assert server.process.returncode == 0 and time.monotonic() - signalled < budget, server.log()
    finally:
        server.stop()


def test_past_the_drain_budget_the_running_job_is_cut_short_and_the_queued_one_refused(tmp_path):
    budget = 4
    server = start_server(tmp_path, env={"SDFC_DRAIN_SECONDS": str(budget)})
    try:
        running, first = post_in_thread(server, {**LONG, "steps": 150})  # far longer than the budget
        wait_until_sampling(server)
        queued, second = post_in_thread(server, SHORT)
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        running.join(budget + 5), queued.join(budget + 5)
        # The running job is interrupted and answers with the image so far; the queued one gets a clean 503.
        assert first["status"] == 200 and len(first["body"]["images"]) == 1, first
        assert first["at"] - signalled <= budget + 1
        assert second["status"] == 503 and set(second["body"]) == {"error", "detail", "body", "errors"}, second
        server.process.wait(budget + 5)
        assert server.process.returncode == 0 and time.monotonic() - signalled < budget + 3, server.log()
    finally:
        server.stop()


def test_a_record_left_in_the_spool_is_written_at_the_next_start_without_a_request(tmp_path):
    # First server: its database refuses connections, so the generation's record stays in the spool.
    dead_db = {"SDFC_DATABASE_URL": "mysql://root@127.0.0.1:1/sdfc?connect_timeout=1",
               "SDFC_DISPATCH_DRAIN_S": "1", "SDFC_DRAIN_SECONDS": "10"}
    first = start_server(tmp_path, env=dead_db)
    try:
        r = requests.post(first.url + "/sdapi/v1/txt2img", json=SHORT, auth=(USER, PASSWORD), timeout=60)
        assert r.status_code == 200
    finally:
        first.stop()
    spool = tmp_path / "data" / "spool"
    assert [p for p in spool.rglob("*") if p.is_file() and "rejected" not in p.parts], "the record was not spooled"

    # Second server, same data folder, a working database: no request is ever sent to it.
    second = start_server(tmp_path, wait=False)
    store = open_store(f"sqlite:///{tmp_path / 'data' / 'sdfc.db'}")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and second.process.poll() is None:
            try:
                if store.count():
                    break
            except Exception:  # noqa: BLE001 - the database file or table may not exist yet
                pass
            time.sleep(0.2)
        assert store.count() == 1, second.log()
        assert "sdfc.access" not in second.log()  # written without any HTTP request
    finally:
        store.close()
        second.stop()
