"""Per-user history and cost in the records: the accounting columns of `generated_images` (user, gpu_seconds,
cost, task_id) on both backends, the writer's checks of them, the gallery's per-user visibility and the usage
sums, over real databases (SQLite and the shared MariaDB) and a real server."""
from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import defaultdict
from datetime import datetime, timezone

import pytest
import requests

from sdfc.pricing import Pricing
from sdfc.records import OutputsStore, RecordRejected, RecordWriter, open_store
from sdfc.records.events import encode_event, event_from_generation, image_key
from sdfc.records.store import GalleryQuery

from . import mariadb
from .live_server import AUTH, PASSWORD, SECOND_PASSWORD, SECOND_USER, USER, start_server

PNG = bytes.fromhex("89504e470d0a1a0a") + b"usage test bytes"
ACCOUNTING = ("user", "gpu_seconds", "cost", "task_id")
ADMIN, ADMIN_PASSWORD = "carol", "Adm1n-carol!"


@pytest.fixture(scope="module")
def mysql_db():
    with mariadb.temp_database() as name:
        yield name


@pytest.fixture(params=["sqlite", "mysql"])
def backend(request, tmp_path, mysql_db):
    """(store, outputs, writer) on a fresh table."""
    if request.param == "sqlite":
        store = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    else:
        mariadb.fetch(mysql_db, "DROP TABLE IF EXISTS generated_images")
        store = open_store(mariadb.url(mysql_db))
    outputs = OutputsStore(tmp_path / "outputs")
    yield store, outputs, RecordWriter(store, outputs)
    store.close()


def make_event(outputs: OutputsStore, request_id: str, index: int = 0, when: datetime | None = None,
               model: str = "tiny-sd", **accounting) -> dict:
    """An event as the sink builds it; `accounting` (user, gpu_seconds, cost, task_id) only when given, as
    records from before they existed lacked them."""
    when = when or datetime.now(timezone.utc)
    record = {"request_id": request_id, "image_index": index, "prompt": f"usage {request_id}", "steps": 2,
              "seed": 7, "model": model, "image_format": "png", "image_bytes": PNG, **accounting}
    key = image_key(request_id, index, "png", when)
    outputs.put(key, PNG)
    return event_from_generation(record, key, when)


def all_rows(store) -> list[dict]:
    return store._fetch("SELECT `id`, `created_at`, `model`, `user`, `gpu_seconds`, `cost`, `task_id` "
                        "FROM `generated_images`")


# --- Schema ---------------------------------------------------------------------------------------------------

PREVIOUS_SQLITE = ("CREATE TABLE generated_images (id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT, "
                   "negative_prompt TEXT, steps TEXT, seed TEXT, sampler TEXT, cfg_scale TEXT, size TEXT, "
                   "model_hash TEXT, model TEXT, image_base64 TEXT, request_id TEXT, image_index INTEGER, "
                   "created_at TEXT, image_key TEXT, image_format TEXT, infotext TEXT)")
PREVIOUS_MYSQL = """CREATE TABLE generated_images (
    id int NOT NULL AUTO_INCREMENT PRIMARY KEY, prompt text, negative_prompt text, steps varchar(255),
    seed varchar(255), sampler varchar(255), cfg_scale varchar(255), size varchar(255),
    model_hash varchar(255), model varchar(255), image_base64 mediumtext, request_id varchar(128),
    image_index int, created_at datetime(3), image_key varchar(512), image_format varchar(16),
    infotext mediumtext, UNIQUE KEY uq_generated_images_record (request_id, image_index),
    KEY ix_generated_images_created (created_at), KEY ix_generated_images_model (model)
    ) DEFAULT CHARSET=utf8mb4"""


def test_sqlite_table_of_the_previous_version_gains_the_accounting_columns(tmp_path):
    path = tmp_path / "previous.db"
    conn = sqlite3.connect(path)
    conn.execute(PREVIOUS_SQLITE)
    conn.execute("INSERT INTO generated_images (prompt, request_id, image_index) VALUES ('before', 'old', 0)")
    conn.commit()
    conn.close()
    store = open_store(f"sqlite:///{path}")
    outputs = OutputsStore(tmp_path / "outputs")
    RecordWriter(store, outputs).handle(encode_event(make_event(outputs, "new", user=USER, gpu_seconds=1.25,
                                                                cost=0.0004, task_id="sdfc-t1")))
    store.close()
    conn = sqlite3.connect(path)
    types = {r[1]: r[2] for r in conn.execute('PRAGMA table_info("generated_images")')}
    assert {k: types[k] for k in ACCOUNTING} == {"user": "TEXT", "gpu_seconds": "REAL", "cost": "REAL",
                                                 "task_id": "TEXT"}
    index = [r[2] for r in conn.execute('PRAGMA index_info("ix_generated_images_user_created")')]
    assert index == ["user", "created_at"]
    rows = {r[0]: r[1:] for r in conn.execute("SELECT request_id, user, gpu_seconds, cost, task_id "
                                               "FROM generated_images")}
    conn.close()
    assert rows == {"old": (None, None, None, None), "new": (USER, 1.25, 0.0004, "sdfc-t1")}


def test_mysql_table_of_the_previous_version_gains_the_accounting_columns(mysql_db, tmp_path):
    mariadb.fetch(mysql_db, "DROP TABLE IF EXISTS generated_images")
    mariadb.fetch(mysql_db, PREVIOUS_MYSQL)
    mariadb.fetch(mysql_db, "INSERT INTO generated_images (prompt, request_id, image_index) "
                            "VALUES ('before', 'old', 0)")
    store = open_store(mariadb.url(mysql_db))
    outputs = OutputsStore(tmp_path / "outputs")
    RecordWriter(store, outputs).handle(encode_event(make_event(outputs, "new", user=USER, gpu_seconds=1.25,
                                                                cost=0.0004, task_id="sdfc-t1")))
    store.close()
    cols = mariadb.fetch(mysql_db, "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE FROM information_schema.COLUMNS "
                                   "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'generated_images'", (mysql_db,))
    types = {c["COLUMN_NAME"]: (c["COLUMN_TYPE"], c["IS_NULLABLE"]) for c in cols}
    assert {k: types[k] for k in ACCOUNTING} == {"user": ("varchar(128)", "YES"), "gpu_seconds": ("double", "YES"),
                                                 "cost": ("double", "YES"), "task_id": ("varchar(64)", "YES")}
    index = mariadb.fetch(mysql_db, "SHOW INDEX FROM generated_images WHERE Key_name = "
                                    "'ix_generated_images_user_created'")
    assert [k["Column_name"] for k in sorted(index, key=lambda k: k["Seq_in_index"])] == ["user", "created_at"]
    rows = {r["request_id"]: (r["user"], r["gpu_seconds"], r["cost"], r["task_id"])
            for r in mariadb.fetch(mysql_db, "SELECT request_id, user, gpu_seconds, cost, task_id "
                                             "FROM generated_images")}
    assert rows == {"old": (None, None, None, None), "new": (USER, 1.25, 0.0004, "sdfc-t1")}


# --- Events ---------------------------------------------------------------------------------------------------

def test_events_with_and_without_the_accounting_fields_store(backend):
    store, outputs, writer = backend
    full = writer.handle(encode_event(make_event(outputs, "full", user=USER, gpu_seconds=0.5, cost=0.00012,
                                                 task_id="sdfc-abc")))
    untasked = writer.handle(encode_event(make_event(outputs, "api", user="", gpu_seconds=2, cost=0,
                                                     task_id=None)))
    old = make_event(outputs, "old")
    for name in ACCOUNTING:
        old.pop(name)  # an event (or spool entry) written before these fields existed
    legacy = writer.handle(json.dumps(old))
    rows = {r["id"]: r for r in all_rows(store)}
    assert {k: rows[full["id"]][k] for k in ACCOUNTING} == {"user": USER, "gpu_seconds": 0.5, "cost": 0.00012,
                                                            "task_id": "sdfc-abc"}
    assert {k: rows[untasked["id"]][k] for k in ACCOUNTING} == {"user": "", "gpu_seconds": 2.0, "cost": 0.0,
                                                                "task_id": None}
    assert {k: rows[legacy["id"]][k] for k in ACCOUNTING} == dict.fromkeys(ACCOUNTING)


HOSTILE = {
    "nan cost": ("cost", math.nan), "infinite cost": ("cost", math.inf), "negative cost": ("cost", -0.01),
    "negative seconds": ("gpu_seconds", -1), "seconds as text": ("gpu_seconds", "1.5"),
    "cost as text": ("cost", "0.1"), "cost as bool": ("cost", True), "huge int seconds": ("gpu_seconds", 10**400),
    "300-char user": ("user", "u" * 300), "129-char user": ("user", "ü" * 129), "user as list": ("user", ["a"]),
    "65-char task": ("task_id", "t" * 65), "lone surrogate user": ("user", "bad\ud800"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_accounting_values_are_rejected_by_name(backend, case):
    store, outputs, writer = backend
    name, value = HOSTILE[case]
    event = make_event(outputs, "hostile", **{name: value})
    with pytest.raises(RecordRejected, match=name):
        writer.handle(encode_event(event))
    assert store.count() == 0


def test_a_user_name_at_the_column_limit_is_kept_whole(backend):
    store, outputs, writer = backend
    result = writer.handle(encode_event(make_event(outputs, "limit", user="ü" * 128, task_id="t" * 64)))
    row = next(r for r in all_rows(store) if r["id"] == result["id"])
    assert row["user"] == "ü" * 128 and row["task_id"] == "t" * 64


# --- Usage sums -------------------------------------------------------------------------------------------------

def expected_usage(rows: list[dict]) -> dict:
    """The usage answer computed from the rows themselves."""
    def sums(group):
        return {"images": len(group), "gpu_seconds": sum(r["gpu_seconds"] or 0 for r in group),
                "cost": sum(r["cost"] or 0 for r in group)}

    def grouped(key, name):
        groups = defaultdict(list)
        for row in rows:
            groups[key(row)].append(row)
        return [{name: k, **sums(groups[k])} for k in sorted(groups, key=lambda k: (k is not None, k or ""))]

    return {"total": sums(rows),
            "by_day": grouped(lambda r: r["created_at"].date().isoformat() if r["created_at"] else None, "day"),
            "by_model": grouped(lambda r: r["model"], "model"), "by_user": grouped(lambda r: r["user"], "user")}


def assert_usage(actual: dict, expected: dict) -> None:
    assert set(actual) >= set(expected)
    for name in expected:
        got = [actual[name]] if name == "total" else actual[name]
        want = [expected[name]] if name == "total" else expected[name]
        assert len(got) == len(want), (name, got, want)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-7), (name, got, want)


def test_usage_sums_equal_the_rows(backend):
    store, outputs, writer = backend
    plan = [("d1a", datetime(2026, 12, 1, 0, 0, 0, 5000, timezone.utc), "tiny-sd", USER, 1.5, 0.000321),
            ("d1b", datetime(2026, 12, 1, 23, 59, 59, 999000, timezone.utc), "other", SECOND_USER, 0.25, 0.00005),
            ("d2a", datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc), "tiny-sd", USER, 3.0, 0.0011),
            ("d2b", datetime(2026, 12, 2, 13, 0, tzinfo=timezone.utc), "tiny-sd", SECOND_USER, None, None),
            ("d3a", datetime(2026, 12, 3, 1, 0, tzinfo=timezone.utc), "other", USER, 0.0, 0.0)]
    for i, (request_id, when, model, user, seconds, cost) in enumerate(plan):
        for index in range(1 + i % 2):  # some generations of two images
            writer.handle(encode_event(make_event(outputs, request_id, index, when, model, user=user,
                                                  gpu_seconds=seconds, cost=cost)))
    writer.handle(encode_event(make_event(outputs, "legacy", when=datetime(2026, 12, 2, tzinfo=timezone.utc))
                               | dict.fromkeys(ACCOUNTING)))
    rows = all_rows(store)
    assert len(rows) == 8

    assert_usage(store.usage(GalleryQuery()), expected_usage(rows))
    mine = [r for r in rows if r["user"] == USER]
    assert_usage(store.usage(GalleryQuery(user=USER)), expected_usage(mine))
    since, until = datetime(2026, 12, 2), datetime(2026, 12, 3)
    window = [r for r in rows if since <= r["created_at"] < until]
    assert_usage(store.usage(GalleryQuery(since=since, until=until), request=True), expected_usage(window))
    nothing = store.usage(GalleryQuery(since=datetime(2030, 1, 1)), request=True)
    assert nothing == {"total": {"images": 0, "gpu_seconds": 0.0, "cost": 0.0}, "by_day": [], "by_model": [],
                       "by_user": []}


# --- Over a real server -----------------------------------------------------------------------------------------

SMALL = dict(width=64, height=64, steps=2)


def as_user(user: str, password: str) -> requests.Session:
    s = requests.Session()
    s.auth = (user, password)
    return s


ALICE, BOB, CAROL = (USER, PASSWORD), (SECOND_USER, SECOND_PASSWORD), (ADMIN, ADMIN_PASSWORD)


@pytest.fixture(scope="module", params=["sqlite", "mysql"])
def served(request, tmp_path_factory):
    """(server, store, {user: [record ids]}) after alice generated three images (two requests) and bob one."""
    tmp = tmp_path_factory.mktemp(f"usage-{request.param}")
    if request.param == "mysql":
        with mariadb.temp_database() as name:
            yield from _serve(tmp, mariadb.url(name))
    else:
        yield from _serve(tmp, f"sqlite:///{tmp / 'records.db'}")


def _serve(tmp, database_url: str):
    server = start_server(tmp, env={"SDFC_DATABASE_URL": database_url, "SDFC_DISPATCH": "local",
                                    "SDFC_AUTH": f"{AUTH},{ADMIN}:{ADMIN_PASSWORD}", "SDFC_ADMINS": ADMIN})
    store = open_store(database_url)
    try:
        for (user, password), prompt, batch in ((ALICE, "alice's lighthouse", 2), (ALICE, "alice's sea", 1),
                                               (BOB, "bob's tower", 1)):
            response = as_user(user, password).post(server.url + "/sdapi/v1/txt2img", timeout=60,
                                                    json={**SMALL, "prompt": prompt, "batch_size": batch})
            assert response.status_code == 200, response.text
        ids = wait_for_rows(store, 4)
        yield server, store, ids
    finally:
        server.stop()
        store.close()


def wait_for_rows(store, count: int, timeout: float = 20) -> dict[str, list[int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = all_rows(store)
        if len(rows) >= count:
            ids = defaultdict(list)
            for row in rows:
                ids[row["user"]].append(row["id"])
            return dict(ids)
        time.sleep(0.05)
    raise AssertionError(f"{len(all_rows(store))} of {count} records after {timeout} s")


def listed_ids(server, who, **params) -> set[int]:
    response = as_user(*who).get(server.url + "/gallery/api/images", params={"page_size": 100, **params},
                                 timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == len(body["items"])
    return {item["id"] for item in body["items"]}


def test_generated_records_name_their_user_and_cost(served):
    server, store, ids = served
    assert sorted(ids) == sorted([SECOND_USER, USER]) and len(ids[USER]) == 3 and len(ids[SECOND_USER]) == 1
    for row in all_rows(store):
        assert row["gpu_seconds"] > 0 and row["task_id"] is None
        assert row["cost"] == pytest.approx(Pricing().cost(row["gpu_seconds"]), abs=1e-8)
    item = as_user(*ALICE).get(server.url + f"/gallery/api/images/{ids[USER][0]}", timeout=10).json()
    assert item["user"] == USER and item["gpu_seconds"] > 0 and item["cost"] > 0


def test_a_user_sees_only_their_own_images(served):
    server, _, ids = served
    assert listed_ids(server, ALICE) == set(ids[USER])
    assert listed_ids(server, BOB) == set(ids[SECOND_USER])
    assert listed_ids(server, BOB, user=USER) == set(ids[SECOND_USER])  # a non-admin's ?user= is ignored
    theirs = ids[USER][0]
    for path in (f"/gallery/api/images/{theirs}", f"/gallery/api/images/{theirs}?include=image",
                 f"/gallery/api/images/{theirs}/image.png"):
        response = as_user(*BOB).get(server.url + path, timeout=10)
        assert response.status_code == 404 and response.json()["error"] == "NotFound", path
        assert as_user(*ALICE).get(server.url + path, timeout=10).status_code == 200, path
    assert as_user(*BOB).get(server.url + f"/gallery/api/images/{ids[SECOND_USER][0]}/image.png",
                             timeout=10).status_code == 200


def test_an_admin_sees_everyone_and_may_filter_by_user(served):
    server, _, ids = served
    assert listed_ids(server, CAROL) == set(ids[USER]) | set(ids[SECOND_USER])
    assert listed_ids(server, CAROL, user=SECOND_USER) == set(ids[SECOND_USER])
    for record_id in ids[USER] + ids[SECOND_USER]:
        assert as_user(*CAROL).get(server.url + f"/gallery/api/images/{record_id}", timeout=10).status_code == 200


def usage(server, who, **params) -> dict:
    response = as_user(*who).get(server.url + "/gallery/api/usage", params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_usage_over_http_equals_the_rows_each_caller_may_see(served):
    server, store, _ = served
    rows = all_rows(store)
    everyone = usage(server, CAROL)
    assert everyone["currency"] == "USD"
    assert_usage(everyone, expected_usage(rows))
    assert [u["user"] for u in everyone["by_user"]] == sorted([SECOND_USER, USER])
    assert_usage(usage(server, CAROL, user=USER), expected_usage([r for r in rows if r["user"] == USER]))
    for (user, password) in (ALICE, BOB):
        own = [r for r in rows if r["user"] == user]
        assert_usage(usage(server, (user, password)), expected_usage(own))
        assert_usage(usage(server, (user, password), user=ADMIN), expected_usage(own))  # still only their own
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert usage(server, CAROL, since=today, until=today)["total"]["images"] == len(rows)
    assert usage(server, CAROL, since="2000-01-01", until="2000-01-02")["total"] == {
        "images": 0, "gpu_seconds": 0, "cost": 0}
    bad = as_user(*ALICE).get(server.url + "/gallery/api/usage", params={"since": "yesterday"}, timeout=10)
    assert bad.status_code == 400 and "since" in bad.json()["detail"]
    assert requests.get(server.url + "/gallery/api/usage", timeout=10).status_code == 401


def test_without_auth_the_one_local_user_sees_everything(tmp_path):
    database_url = f"sqlite:///{tmp_path / 'records.db'}"
    store = open_store(database_url)
    outputs = OutputsStore(tmp_path / "outputs")
    writer = RecordWriter(store, outputs)
    for request_id, user in (("a", USER), ("b", SECOND_USER), ("local", "")):
        writer.handle(encode_event(make_event(outputs, request_id, user=user, gpu_seconds=1.0, cost=0.5)))
    rows = all_rows(store)
    store.close()
    server = start_server(tmp_path, env={"SDFC_DATABASE_URL": database_url, "SDFC_DISPATCH": "local",
                                         "SDFC_AUTH": ""})
    try:
        listing = requests.get(server.url + "/gallery/api/images", timeout=10).json()
        assert {i["id"] for i in listing["items"]} == {r["id"] for r in rows}
        for row in rows:
            assert requests.get(server.url + f"/gallery/api/images/{row['id']}", timeout=10).status_code == 200
        filtered = requests.get(server.url + "/gallery/api/images", params={"user": USER}, timeout=10).json()
        assert [i["user"] for i in filtered["items"]] == [USER]
        assert_usage(requests.get(server.url + "/gallery/api/usage", timeout=10).json(), expected_usage(rows))
    finally:
        server.stop()
