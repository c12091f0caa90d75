"""Record stores and the writer against real databases: MariaDB (a throwaway database on 127.0.0.1:3306) and
SQLite. Schema exactly as the original service's, upgrades of an existing table, idempotent upserts under
concurrency, hostile data, gallery queries."""
from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import threading
from datetime import datetime, timedelta, timezone

import pytest

from sdfc.records import OutputsStore, RecordRejected, RecordWriter, open_store
from sdfc.records.events import decode_event, encode_event, event_from_generation, image_key
from sdfc.records.store import GalleryQuery

from . import mariadb

PNG = bytes.fromhex("89504e470d0a1a0a") + b"not really a png, but bytes are bytes \x00\xff"
ORIGINAL_TYPES = {"id": "int", "prompt": "text", "negative_prompt": "text", "steps": "varchar(255)",
                  "seed": "varchar(255)", "sampler": "varchar(255)", "cfg_scale": "varchar(255)",
                  "size": "varchar(255)", "model_hash": "varchar(255)", "model": "varchar(255)",
                  "image_base64": "mediumtext"}


@pytest.fixture(scope="module")
def mysql_db():
    with mariadb.temp_database() as name:
        yield name


@pytest.fixture(params=["sqlite", "mysql"])
def backend(request, tmp_path, mysql_db):
    """(store, outputs, writer, kind) on a fresh table."""
    if request.param == "sqlite":
        store = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    else:
        store = open_store(mariadb.url(mysql_db))
        mariadb.fetch(mysql_db, "DROP TABLE IF EXISTS generated_images")
    outputs = OutputsStore(tmp_path / "outputs")
    yield store, outputs, RecordWriter(store, outputs), request.param
    store.close()


def make_event(outputs: OutputsStore, request_id="req-1", index=0, prompt="a lighthouse", image=PNG,
               when=None, **extra) -> dict:
    when = when or datetime.now(timezone.utc)
    record = {"request_id": request_id, "image_index": index, "prompt": prompt, "negative_prompt": "fog",
              "steps": 2, "seed": 1234 + index, "sampler": "Euler a", "cfg_scale": 6.5, "size": "64x64",
              "model_hash": "e8b3bb4a7a", "model": "tiny-sd", "infotext": f"{prompt}\nSteps: 2",
              "image_format": "png", "image_bytes": image, **extra}
    key = image_key(request_id, index, "png", when)
    outputs.put(key, image)
    return event_from_generation(record, key, when)


def test_mysql_table_has_the_original_columns_and_types(mysql_db, tmp_path):
    store = open_store(mariadb.url(mysql_db))
    mariadb.fetch(mysql_db, "DROP TABLE IF EXISTS generated_images")
    assert store.count() == 0  # first use creates the table
    cols = mariadb.fetch(mysql_db, "SELECT COLUMN_NAME, COLUMN_TYPE, COLUMN_KEY, EXTRA, COLLATION_NAME "
                                   "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND "
                                   "TABLE_NAME = 'generated_images' ORDER BY ORDINAL_POSITION", (mysql_db,))
    types = {c["COLUMN_NAME"]: c["COLUMN_TYPE"].replace("int(11)", "int") for c in cols}
    assert list(types)[:len(ORIGINAL_TYPES)] == list(ORIGINAL_TYPES)
    assert {k: types[k] for k in ORIGINAL_TYPES} == ORIGINAL_TYPES
    assert cols[0]["COLUMN_KEY"] == "PRI" and "auto_increment" in cols[0]["EXTRA"]
    assert set(types) - set(ORIGINAL_TYPES) == {"request_id", "image_index", "created_at", "image_key",
                                                "image_format", "infotext", "user", "gpu_seconds", "cost",
                                                "task_id"}
    table = mariadb.fetch(mysql_db, "SELECT TABLE_COLLATION FROM information_schema.TABLES WHERE "
                                    "TABLE_SCHEMA = %s AND TABLE_NAME = 'generated_images'", (mysql_db,))[0]
    has_0900 = mariadb.fetch(mysql_db, "SHOW COLLATION LIKE 'utf8mb4_0900_ai_ci'")
    default = mariadb.fetch(mysql_db, "SELECT DEFAULT_COLLATE_NAME AS c FROM information_schema.CHARACTER_SETS "
                                      "WHERE CHARACTER_SET_NAME = 'utf8mb4'")[0]["c"]
    assert table["TABLE_COLLATION"] == ("utf8mb4_0900_ai_ci" if has_0900 else default)
    assert all(c["COLLATION_NAME"] in (None, table["TABLE_COLLATION"]) for c in cols)
    store.close()


def test_an_original_table_is_upgraded_in_place(mysql_db, tmp_path):
    """A table made by the original service (its DDL, minus the duplicate primary key) keeps its rows and
    gains the added columns and the idempotency key on first use."""
    mariadb.fetch(mysql_db, "DROP TABLE IF EXISTS generated_images")
    mariadb.fetch(mysql_db, """CREATE TABLE generated_images (
        id int NOT NULL AUTO_INCREMENT PRIMARY KEY, prompt text, negative_prompt text, steps varchar(255),
        seed varchar(255), sampler varchar(255), cfg_scale varchar(255), size varchar(255),
        model_hash varchar(255), model varchar(255), image_base64 mediumtext) DEFAULT CHARSET=utf8mb4""")
    mariadb.fetch(mysql_db, "INSERT INTO generated_images (prompt, steps, seed, model, image_base64) "
                            "VALUES ('legacy', '20', '42', 'v1-5', 'AAAA')")
    store = open_store(mariadb.url(mysql_db))
    outputs = OutputsStore(tmp_path / "outputs")
    RecordWriter(store, outputs).handle(encode_event(make_event(outputs)))
    rows, total = store.query(GalleryQuery())
    assert total == 2 and [r["prompt"] for r in rows] == ["a lighthouse", "legacy"]  # legacy (no time) last
    legacy = store.get(rows[1]["id"], with_image=True)
    assert legacy["seed"] == "42" and legacy["image_base64"] == "AAAA" and legacy["request_id"] is None
    keys = mariadb.fetch(mysql_db, "SHOW INDEX FROM generated_images WHERE Key_name = "
                                   "'uq_generated_images_record'")
    assert [k["Column_name"] for k in keys] == ["request_id", "image_index"] and keys[0]["Non_unique"] == 0
    store.close()


def test_sqlite_table_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE generated_images (id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT, "
                 "negative_prompt TEXT, steps TEXT, seed TEXT, sampler TEXT, cfg_scale TEXT, size TEXT, "
                 "model_hash TEXT, model TEXT, image_base64 TEXT)")
    conn.execute("INSERT INTO generated_images (prompt) VALUES ('legacy')")
    conn.commit()
    conn.close()
    store = open_store(f"sqlite:///{path}")
    outputs = OutputsStore(tmp_path / "outputs")
    RecordWriter(store, outputs).handle(encode_event(make_event(outputs)))
    assert [r["prompt"] for r in store.query(GalleryQuery())[0]] == ["a lighthouse", "legacy"]


def test_writer_stores_every_field_and_the_exact_image(backend):
    store, outputs, writer, _ = backend
    result = writer.handle(encode_event(make_event(outputs, request_id="abc", index=1)))
    row = store.get(result["id"], with_image=True)
    assert {k: row[k] for k in ("prompt", "negative_prompt", "steps", "seed", "sampler", "cfg_scale", "size",
                                "model_hash", "model", "request_id", "image_index", "image_format")} == {
        "prompt": "a lighthouse", "negative_prompt": "fog", "steps": "2", "seed": "1235", "sampler": "Euler a",
        "cfg_scale": "6.5", "size": "64x64", "model_hash": "e8b3bb4a7a", "model": "tiny-sd",
        "request_id": "abc", "image_index": 1, "image_format": "png"}
    assert base64.b64decode(row["image_base64"]) == PNG
    assert row["infotext"] == "a lighthouse\nSteps: 2" and isinstance(row["created_at"], datetime)


def test_same_event_twice_gives_one_row(backend):
    store, outputs, writer, _ = backend
    body = encode_event(make_event(outputs, request_id="twice"))
    first, second = writer.handle(body), writer.handle(body)
    assert first["id"] == second["id"] and store.count() == 1


def test_fifty_events_from_eight_threads_give_fifty_rows(backend):
    store, outputs, writer, _ = backend
    bodies = [encode_event(make_event(outputs, request_id=f"burst-{i // 2}", index=i % 2)) for i in range(50)]
    errors, lock = [], threading.Lock()

    def work(chunk):
        for body in chunk:
            try:
                writer.handle(body)
                writer.handle(body)  # and each one redelivered: still one row
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=work, args=(bodies[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.count() == 50
    ids = {(r["request_id"], r["image_index"]) for r in store.query(GalleryQuery(page_size=100))[0]}
    assert len(ids) == 50


HOSTILE = ["it's \"quoted\" `back` \\slash", "'; DROP TABLE generated_images; --", "nul\x00byte\x00",
           "emoji 🎨🌊👩‍🚀 and 中文", "%_ wildcards ! and \r\n newlines\t", "x" * 60_000]


@pytest.mark.parametrize("prompt", HOSTILE, ids=["quotes", "drop-table", "nul", "emoji", "wildcards", "60kB"])
def test_hostile_prompts_are_stored_verbatim(backend, prompt):
    store, outputs, writer, _ = backend
    result = writer.handle(encode_event(make_event(outputs, prompt=prompt, negative_prompt=prompt,
                                                   model=prompt[:255])))
    row = store.get(result["id"], with_image=True)
    assert row["prompt"] == prompt and row["negative_prompt"] == prompt and row["model"] == prompt[:255]
    assert store.count() == 1


@pytest.mark.parametrize("field,value,message", [
    ("prompt", "x" * 100_000, "prompt is 100000 bytes; column prompt text holds 65535"),
    ("prompt", "🎨" * 20_000, "prompt is 80000 bytes"),
    ("model", "m" * 256, "model is 256 characters; column model varchar(255) holds 255"),
    ("negative_prompt", "lone \ud800 surrogate", "negative_prompt is not valid Unicode"),
])
def test_values_that_do_not_fit_are_refused_by_name(backend, field, value, message):
    store, outputs, writer, _ = backend
    event = make_event(outputs)
    event[field] = value
    with pytest.raises(RecordRejected, match=message.replace("(", r"\(").replace(")", r"\)")):
        writer.handle(encode_event(event))
    assert store.count() == 0  # nothing half-written, table intact


@pytest.mark.parametrize("body,message", [
    (b"not json", "event is not JSON"), (b"[1, 2]", "must be a JSON object"),
    (b'{"v": 99}', "unsupported event version"),
    (json.dumps({"v": 1, "request_id": "r", "image_index": 0, "image_key": "../../etc/passwd"}).encode(),
     "invalid outputs key"),
    (json.dumps({"v": 1, "request_id": "r; DROP", "image_index": -1}).encode(), "image_index must be"),
])
def test_malformed_events_are_refused(backend, body, message):
    _, _, writer, _ = backend
    with pytest.raises(RecordRejected, match=message):
        writer.handle(body)


def test_large_events_are_spilled_to_the_outputs_store(tmp_path):
    outputs = OutputsStore(tmp_path)
    event = make_event(outputs, prompt="🎨" * 16_000)
    event["infotext"] = event["prompt"] * 2
    body = encode_event(event, outputs, max_bytes=128 * 1024)
    assert len(body) < 1024 and json.loads(body)["event_key"].startswith("events/")
    assert decode_event(body, outputs) == event


def test_gallery_queries(backend):
    store, outputs, writer, kind = backend
    base = datetime(2024, 8, 1, 12, 0, tzinfo=timezone.utc)
    for i in range(7):
        writer.handle(encode_event(make_event(
            outputs, request_id=f"q{i}", prompt=f"lighthouse {i}" if i % 2 else f"100% sea_{i}",
            model="tiny-sd" if i < 5 else "other", when=base + timedelta(days=i))))
    rows, total = store.query(GalleryQuery(page=1, page_size=3))
    assert total == 7 and [r["request_id"] for r in rows] == ["q6", "q5", "q4"]
    rows, _ = store.query(GalleryQuery(page=3, page_size=3))
    assert [r["request_id"] for r in rows] == ["q0"]
    assert store.query(GalleryQuery(text="LIGHTHOUSE"))[1] == 3
    assert [r["request_id"] for r in store.query(GalleryQuery(text="0% sea_"))[0]] == ["q6", "q4", "q2", "q0"]
    assert store.query(GalleryQuery(text="0%_sea"))[1] == 0  # wildcards are literal
    assert store.query(GalleryQuery(model="other"))[1] == 2
    since, until = datetime(2024, 8, 3), datetime(2024, 8, 5)
    assert [r["request_id"] for r in store.query(GalleryQuery(since=since, until=until))[0]] == ["q3", "q2"]
    assert store.models() == ["other", "tiny-sd"]
    assert "image_base64" not in rows[0]


def test_outputs_keys_cannot_escape(tmp_path):
    outputs = OutputsStore(tmp_path)
    for key in ("../x", "/etc/passwd", "a/../../b", "", "a//b", ".hidden"):
        with pytest.raises(ValueError):
            outputs.put(key, b"x")
    # A request id that is not a plain id becomes a stable hash: safe in paths, same key on redelivery.
    weird = image_key("we/ird id'", 0, "png", datetime(2024, 1, 2))
    assert weird == image_key("we/ird id'", 0, "png", datetime(2024, 1, 2))
    assert weird == "2024/01/02/h-" + hashlib.sha256("we/ird id'".encode()).hexdigest()[:40] + "-0.png"
