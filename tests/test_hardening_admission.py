"""Generations waiting for the engine never take every request thread: past SDFC_MAX_QUEUED_JOBS a generation is
refused at once (503 + Retry-After) and progress keeps answering however many clients generate."""
from __future__ import annotations

import threading
import time

import requests

from .live_server import PASSWORD, USER, start_server

AUTH = (USER, PASSWORD)
SLOW = {"prompt": "a lighthouse", "steps": 40, "width": 256, "height": 256}


def _post_in_background(url: str, body: dict, results: list) -> threading.Thread:
    def run():
        try:
            results.append(requests.post(url, json=body, auth=AUTH, timeout=300).status_code)
        except requests.RequestException as exc:  # recorded: the test asserts on it
            results.append(repr(exc))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for_job(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(server.url + "/sdapi/v1/progress", auth=AUTH, timeout=10).json()["state"]
        if state["job_count"]:
            return
        time.sleep(0.05)
    raise AssertionError("the generation never started")


def test_a_generation_beyond_the_queue_limit_is_refused_at_once(tmp_path):
    server = start_server(tmp_path, env={"SDFC_MAX_QUEUED_JOBS": "2"})
    try:
        results: list = []
        threads = [_post_in_background(server.url + "/sdapi/v1/txt2img", SLOW, results)]
        _wait_for_job(server)
        threads.append(_post_in_background(server.url + "/sdapi/v1/txt2img", {**SLOW, "steps": 2}, results))
        time.sleep(0.5)  # the second one is waiting for the engine now
        started = time.monotonic()
        refused = requests.post(server.url + "/sdapi/v1/txt2img", json=SLOW, auth=AUTH, timeout=30)
        assert time.monotonic() - started < 2
        assert refused.status_code == 503 and refused.headers.get("Retry-After")
        body = refused.json()
        assert set(body) == {"error", "detail", "body", "errors"} and "SDFC_MAX_QUEUED_JOBS" in body["detail"]
        extras = requests.post(server.url + "/sdapi/v1/extra-single-image", json={"image": ""}, auth=AUTH,
                               timeout=30)
        assert extras.status_code == 503
        for thread in threads:
            thread.join(300)
        assert results == [200, 200], results
        # Once the queue has room, generations are admitted again.
        again = requests.post(server.url + "/sdapi/v1/txt2img", json={**SLOW, "steps": 2, "width": 64,
                                                                       "height": 64}, auth=AUTH, timeout=60)
        assert again.status_code == 200
    finally:
        server.stop()


def test_progress_answers_while_many_clients_wait_to_generate(tmp_path):
    server = start_server(tmp_path)
    try:
        results: list = []
        threads = [_post_in_background(server.url + "/sdapi/v1/txt2img", {**SLOW, "steps": 10}, results)
                   for _ in range(10)]
        _wait_for_job(server)
        worst = 0.0
        for _ in range(10):
            started = time.monotonic()
            r = requests.get(server.url + "/sdapi/v1/progress", auth=AUTH, timeout=10)
            worst = max(worst, time.monotonic() - started)
            assert r.status_code == 200
            time.sleep(0.1)
        assert worst < 1.0, worst  # ten generations outstanding, and progress still has threads
        for thread in threads:
            thread.join(300)
        assert results == [200] * 10, results
    finally:
        server.stop()
