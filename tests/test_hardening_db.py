"""Issue 15 (#5, #7, #9): the database can hang or answer odd questions without taking the API with it.

A frozen MariaDB (SIGSTOP of a private instance) behind a real `sdfc serve`: gallery reads answer 503 with
Retry-After within the request timeout, naming no host or driver; /progress stays prompt; a generation succeeds
and its record lands once the database thaws. Gallery dates at the ends of the calendar (with offsets that
overflow in UTC) and ids beyond any integer column answer in the gallery's shape, never 500, on both stores.
"""
from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import requests
from PIL import Image

from sdfc.records import open_store

from . import mariadb
from .live_server import PASSWORD, USER, start_server

SMALL = dict(width=64, height=64, steps=2)
AUTH = (USER, PASSWORD)
REQUEST_TIMEOUT = 2        # the store's request_timeout in these tests (the default is 5 s)
GALLERY_BOUND = REQUEST_TIMEOUT + 1.5  # a gallery answer on a frozen database comes within this
PROGRESS_BOUND = 2.0
ERROR_KEYS = {"error", "detail", "body", "errors"}


def wait_until(predicate, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - the database may still be waking up
            pass
        time.sleep(0.1)
    raise AssertionError(message)


def rows_with_prompt(database: str, port: int, prompt: str) -> int:
    # By prompt, not request id: how a request id becomes a record key is not this test's business.
    return mariadb.fetch(database, "SELECT COUNT(*) AS n FROM generated_images WHERE prompt = %s", (prompt,),
                         port=port)[0]["n"]


def timed_get(url: str, timeout: float = 15) -> tuple[float, requests.Response | Exception]:
    started = time.monotonic()
    try:
        response = requests.get(url, auth=AUTH, timeout=timeout)
    except requests.RequestException as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, response


class ProgressProbe(threading.Thread):
    """Asks /sdapi/v1/progress every 0.2 s and keeps each answer's latency (inf when it failed)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.latencies, self.statuses = url + "/sdapi/v1/progress", [], []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            elapsed, answer = timed_get(self.url, timeout=PROGRESS_BOUND * 3)
            self.latencies.append(elapsed if isinstance(answer, requests.Response) else float("inf"))
            self.statuses.append(answer.status_code if isinstance(answer, requests.Response) else repr(answer))
            self.done.wait(0.2)

    def stop(self) -> None:
        self.done.set()
        self.join(PROGRESS_BOUND * 3 + 1)


def assert_503_without_secrets(elapsed: float, answer, needles: list[str], bound: float):
    assert isinstance(answer, requests.Response), f"no answer after {elapsed:.1f} s: {answer!r}"
    assert answer.status_code == 503, (answer.status_code, answer.text[:300])
    assert elapsed < bound, f"503 took {elapsed:.2f} s (bound {bound} s)"
    assert int(answer.headers["Retry-After"]) >= 1
    body = answer.json()
    assert set(body) == ERROR_KEYS and body["error"] == "StoreUnavailable"
    for needle in needles:
        assert needle.lower() not in answer.text.lower(), f"the 503 body leaks {needle!r}: {answer.text}"


def test_a_frozen_database_costs_gallery_requests_seconds_and_nothing_else(tmp_path):
    (tmp_path / "mariadb").mkdir()
    db = mariadb.PrivateMariaDB(tmp_path / "mariadb").install()
    database = "sdfc_frozen"
    url = (f"mysql://root@127.0.0.1:{db.port}/{database}?connect_timeout=2&request_timeout={REQUEST_TIMEOUT}")
    server, frozen = None, False
    try:
        db.start()
        server = start_server(tmp_path, env={"SDFC_DATABASE_URL": url, "SDFC_DISPATCH": "local",
                                             "SDFC_DISPATCH_MAX_BACKOFF_S": "0.5"})
        http = requests.Session()
        http.auth = AUTH
        assert http.post(server.url + "/sdapi/v1/txt2img", json={**SMALL, "prompt": "before the freeze"},
                         timeout=60).status_code == 200
        wait_until(lambda: rows_with_prompt(database, db.port, "before the freeze") == 1, 30, "first record")
        listing = http.get(server.url + "/gallery/api/images", timeout=10)
        assert listing.status_code == 200, listing.text
        record_id = listing.json()["items"][0]["id"]
        http.close()

        os.kill(db.process.pid, signal.SIGSTOP)
        frozen = True
        probe = ProgressProbe(server.url)
        probe.start()
        gallery = [f"/gallery/api/images?page={i + 1}" for i in range(3)] + [
            "/gallery/api/models", f"/gallery/api/images/{record_id}",
            f"/gallery/api/images/{record_id}?include=image", f"/gallery/api/images/{record_id}/image.png",
            "/gallery/api/images?q=lighthouse"]
        with ThreadPoolExecutor(len(gallery) + 1) as pool:
            reads = [pool.submit(timed_get, server.url + path) for path in gallery]
            started = time.monotonic()
            generation = requests.post(server.url + "/sdapi/v1/txt2img", auth=AUTH, timeout=60,
                                       json={**SMALL, "prompt": "during the freeze"})
            generation_s = time.monotonic() - started
            answers = [f.result() for f in reads]
        # The gate is shut for a while after those failures: later reads fail at once, the database untouched.
        again = [timed_get(server.url + "/gallery/api/images") for _ in range(3)]
        probe.stop()

        assert generation.status_code == 200 and generation.json()["images"], generation.text[:300]
        assert generation_s < 30, f"txt2img took {generation_s:.1f} s with the database frozen"
        needles = ["127.0.0.1", f":{db.port}", str(db.port), "root@", "pymysql", "mysql", "mariadb",
                   "lost connection", "timed out", "operationalerror", database]
        for elapsed, answer in answers:
            assert_503_without_secrets(elapsed, answer, needles, GALLERY_BOUND)
        for elapsed, answer in again:
            assert_503_without_secrets(elapsed, answer, needles, 1.0)
        assert probe.latencies and all(status == 200 for status in probe.statuses), probe.statuses
        assert max(probe.latencies) < PROGRESS_BOUND, f"/progress latencies {probe.latencies}"
        assert "records database unavailable" in server.log()  # the cause is logged for operators

        os.kill(db.process.pid, signal.SIGCONT)
        frozen = False
        wait_until(lambda: rows_with_prompt(database, db.port, "during the freeze") == 1, 30,
                   "the record of the generation made during the freeze never arrived")
        wait_until(lambda: requests.get(server.url + "/gallery/api/images", auth=AUTH, timeout=10
                                        ).json()["total"] == 2, 20, "the gallery did not come back")
    finally:
        if frozen:
            os.kill(db.process.pid, signal.SIGCONT)
        if server is not None:
            server.stop()
        db.stop()


# Date and id edges, on both stores --------------------------------------------------------------------------
def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


EDGE_ROWS = {"early": datetime(1, 1, 1, 18, 0), "now": datetime(2024, 8, 1, 12, 0),
             "late": datetime(9999, 12, 31, 20, 0)}


@pytest.fixture(scope="module", params=["sqlite", "mysql"])
def gallery(request, tmp_path_factory):
    """(server url, {name: id}) over a store holding rows at both ends of the calendar."""
    tmp = tmp_path_factory.mktemp(f"edges-{request.param}")
    if request.param == "mysql":
        with mariadb.temp_database() as name:
            yield from _serve(tmp, mariadb.url(name))
    else:
        yield from _serve(tmp, f"sqlite:///{tmp / 'records.db'}")


def _serve(tmp, database_url: str):
    store = open_store(database_url)
    image = base64.b64encode(_png()).decode()
    ids = {name: store.upsert({"request_id": f"edge-{name}", "image_index": 0, "prompt": f"edge {name}",
                               "model": "tiny-sd", "created_at": when, "image_format": "png",
                               "image_base64": image, "infotext": f"edge {name}",
                               "user": USER})  # the gallery shows a user their own images
           for name, when in EDGE_ROWS.items()}
    store.close()
    server = start_server(tmp, env={"SDFC_DATABASE_URL": database_url, "SDFC_DISPATCH": "local"})
    try:
        yield server.url, ids
    finally:
        server.stop()


def listed(url: str, **params) -> list[str]:
    response = requests.get(url + "/gallery/api/images", params=params, auth=AUTH, timeout=10)
    assert response.status_code == 200, (params, response.status_code, response.text[:300])
    return sorted(item["prompt"].split()[-1] for item in response.json()["items"])


@pytest.mark.parametrize("params, expected", [
    ({"since": "9999-12-31T23:59:59+14:00"}, ["late"]),       # 09:59:59 UTC
    ({"since": "9999-12-31T23:59:59-12:00"}, []),             # after 9999 in UTC: after every row
    ({"since": "9999-12-31T23:59:59.999999-00:30"}, []),
    ({"until": "9999-12-31"}, ["early", "late", "now"]),      # the whole last day: its end overflows
    ({"until": "9999-12-31T23:59:59-12:00"}, ["early", "late", "now"]),
    ({"since": "0001-01-01T00:00:00-12:00"}, ["early", "late", "now"]),  # 12:00 UTC
    ({"since": "0001-01-01T00:00:00+14:00"}, ["early", "late", "now"]),  # before year 1 in UTC
    ({"until": "0001-01-01T00:00:00+14:00"}, []),
    ({"until": "0001-01-01T23:00:00+00:00"}, ["early"]),
    ({"since": "0999-06-01", "until": "2025-01-01"}, ["now"]),  # a three-digit year still sorts before 2024
    ({"since": "2024-08-01", "until": "2024-08-01"}, ["now"]),
])
def test_dates_at_the_ends_of_the_calendar(gallery, params, expected):
    url, _ = gallery
    assert listed(url, **params) == expected


@pytest.mark.parametrize("params", [
    {"since": "yesterday"}, {"until": "2024-13-01"}, {"since": "9" * 2000}, {"since": "10000-01-01"},
    {"until": "2024-01-01T25:00"}, {"page": str(2**63)}, {"page": "-1"}, {"page": "1e3"}, {"page": "9" * 2000},
    {"page_size": "0"}, {"page_size": "nan"},
])
def test_bad_list_parameters_are_400_in_the_gallery_shape(gallery, params):
    url, _ = gallery
    response = requests.get(url + "/gallery/api/images", params=params, auth=AUTH, timeout=10)
    assert response.status_code == 400, (params, response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == ERROR_KEYS and body["error"] == "ValueError"


@pytest.mark.parametrize("raw", [str(2**63), str(2**63 - 1), str(2**64), str(2**31), "9" * 30, "9" * 2000,
                                 "0", "-1", "-9223372036854775809", "abc", "1e3", "0x10", "1.0", "%201",
                                 "%EF%BC%91", "%F0%9F%8E%A8"])
def test_ids_beyond_any_row_are_404_in_the_gallery_shape(gallery, raw):
    url, _ = gallery
    for path in (f"/gallery/api/images/{raw}", f"/gallery/api/images/{raw}?include=image",
                 f"/gallery/api/images/{raw}/image.png"):
        response = requests.get(url + path, auth=AUTH, timeout=10)
        assert response.status_code == 404, (path, response.status_code, response.text[:300])
        body = response.json()
        assert set(body) == ERROR_KEYS and body["error"] == "NotFound"


def test_real_ids_still_answer(gallery):
    url, ids = gallery
    one = requests.get(url + f"/gallery/api/images/{ids['late']}", auth=AUTH, timeout=10)
    assert one.status_code == 200 and one.json()["created_at"] == "9999-12-31T20:00:00.000Z"
    early = requests.get(url + f"/gallery/api/images/{ids['early']}", auth=AUTH, timeout=10).json()
    assert early["created_at"] == "0001-01-01T18:00:00.000Z"
    download = requests.get(url + f"/gallery/api/images/{ids['now']}/image.png", auth=AUTH, timeout=10)
    assert download.status_code == 200 and download.content.startswith(b"\x89PNG")
