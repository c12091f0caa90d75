"""Nothing lost: the database down during a burst, a writer failing mid-delivery, a server stopped with
records still pending, a record that can never be stored, an outputs store that refuses a write."""
from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sdfc.dispatch import Dispatcher, RecordSink, Spool
from sdfc.dispatch.transports import LocalTransport
from sdfc.records import OutputsStore, RecordWriter, open_store

from . import mariadb
from .live_server import PASSWORD, USER, start_server

SMALL = dict(width=64, height=64, steps=2)


def rows_by_request(database: str, port: int) -> dict:
    rows = mariadb.fetch(database, "SELECT request_id, image_index, COUNT(*) AS n FROM generated_images "
                                   "GROUP BY request_id, image_index", port=port)
    return {(r["request_id"], r["image_index"]): r["n"] for r in rows}


def rows_by_prompt(database: str, port: int) -> dict:
    """Over HTTP each generation gets its own record key: count rows by what each request asked for."""
    rows = mariadb.fetch(database, "SELECT prompt, image_index, COUNT(*) AS n FROM generated_images "
                                   "GROUP BY prompt, image_index", port=port)
    return {(r["prompt"], r["image_index"]): r["n"] for r in rows}


def wait_until(predicate, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - the database may still be starting
            pass
        time.sleep(0.1)
    raise AssertionError(message)


@pytest.fixture(scope="module")
def private_db(tmp_path_factory):
    db = mariadb.PrivateMariaDB(tmp_path_factory.mktemp("mariadb")).install()
    db.start()
    yield db
    db.stop()


def test_database_down_during_a_burst_loses_nothing(private_db, tmp_path):
    database = "sdfc_faults"
    env = {"SDFC_DATABASE_URL": mariadb.url(database, private_db.port), "SDFC_DISPATCH_MAX_BACKOFF_S": "0.5",
           "SDFC_DISPATCH_DRAIN_S": "1"}
    server = start_server(tmp_path, env=env)
    http = requests.Session()
    http.auth = (USER, PASSWORD)

    def generate(prompt: str) -> int:
        r = http.post(server.url + "/sdapi/v1/txt2img", json={**SMALL, "prompt": prompt}, timeout=60)
        return r.status_code

    try:
        assert generate("warm") == 200
        wait_until(lambda: rows_by_prompt(database, private_db.port) == {("warm", 0): 1}, 20, "warm row")

        private_db.stop()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(generate, [f"burst-{i}" for i in range(10)]))
        assert results == [200] * 10  # every request succeeds, the database down
        spool = Spool(tmp_path / "data" / "spool")
        assert len(spool.names()) == 10  # waiting, durably

        private_db.start()
        expected = {("warm", 0): 1, **{(f"burst-{i}", 0): 1 for i in range(10)}}
        wait_until(lambda: rows_by_prompt(database, private_db.port) == expected, 30,
                   "records did not all arrive after the database came back")

        # Records still pending when the server stops are sent by the next one.
        private_db.stop()
        assert generate("late-0") == 200 and generate("late-1") == 200
    finally:
        server.stop()
    assert len(Spool(tmp_path / "data" / "spool").names()) == 2
    private_db.start()
    server = start_server(tmp_path, env=env)
    try:
        expected.update({("late-0", 0): 1, ("late-1", 0): 1})
        wait_until(lambda: rows_by_prompt(database, private_db.port) == expected, 30,
                   "spooled records were not flushed by the restarted server")
        assert Spool(tmp_path / "data" / "spool").names() == []
    finally:
        server.stop()


class FlakyWriter:
    """Fails some deliveries before the upsert and some after it (the row written, the answer lost)."""

    def __init__(self, writer: RecordWriter, fail_before: set, fail_after: set):
        self.writer, self.fail_before, self.fail_after = writer, set(fail_before), set(fail_after)
        self.calls = 0
        self.lock = threading.Lock()

    def handle(self, body: bytes):
        import json
        request_id = json.loads(body)["request_id"]
        with self.lock:
            self.calls += 1
            before = request_id in self.fail_before and not self.fail_before.discard(request_id)
        if before:
            raise ConnectionError(f"writer crashed before storing {request_id}")
        result = self.writer.handle(body)
        with self.lock:
            after = request_id in self.fail_after and not self.fail_after.discard(request_id)
        if after:
            raise TimeoutError(f"writer stored {request_id} but its answer was lost")
        return result


def record(request_id: str, index: int = 0, prompt: str = "a record") -> dict:
    data = b"\x89PNG\r\n\x1a\n" + request_id.encode()
    return {"request_id": request_id, "image_index": index, "prompt": prompt, "negative_prompt": "",
            "steps": 2, "seed": 11, "sampler": "Euler", "cfg_scale": 7.0, "size": "64x64",
            "model_hash": "e8b3bb4a7a", "model": "tiny-sd", "infotext": prompt, "image_format": "png",
            "image_bytes": data}


def test_writer_failure_mid_delivery_is_redelivered_once(tmp_path):
    with mariadb.temp_database() as database:
        store = open_store(mariadb.url(database))
        outputs = OutputsStore(tmp_path / "outputs")
        flaky = FlakyWriter(RecordWriter(store, outputs), fail_before={"r3", "r7"}, fail_after={"r5", "r9"})
        dispatcher = Dispatcher(Spool(tmp_path / "spool"), LocalTransport(flaky.handle), outputs,
                                base_backoff_s=0.01, max_backoff_s=0.05)
        sink = RecordSink(outputs, dispatcher)
        for i in range(12):
            sink([record(f"r{i}")])
            if i == 6:
                # The server drops our pooled connections (idle timeout, failover): ping, reconnect, go on.
                assert dispatcher.wait_idle(10)
                for row in mariadb.fetch(database, "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s "
                                                   "AND ID <> CONNECTION_ID()", (database,)):
                    mariadb.fetch(database, f"KILL {int(row['ID'])}")
        assert dispatcher.wait_idle(20)
        assert dispatcher.close(1)
        assert rows_by_request(database, 3306) == {(f"r{i}", 0): 1 for i in range(12)}
        assert dispatcher.retries == 4 and flaky.calls == 16
        row = store.find("r5", 0)
        assert base64.b64decode(row["image_base64"]) == b"\x89PNG\r\n\x1a\nr5"
        store.close()


def test_a_record_that_can_never_be_stored_is_set_aside_and_blocks_nothing(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    outputs = OutputsStore(tmp_path / "outputs")
    spool = Spool(tmp_path / "spool")
    dispatcher = Dispatcher(spool, LocalTransport(RecordWriter(store, outputs).handle), outputs,
                            base_backoff_s=0.01, max_backoff_s=0.05)
    sink = RecordSink(outputs, dispatcher)
    sink([record("ok-1"), record("too-big", prompt="x" * 70_000), record("ok-2")])
    assert dispatcher.wait_idle(10)
    dispatcher.close(1)
    assert store.count() == 2 and store.find("too-big", 0) is None
    assert len(spool.rejected()) == 1
    reason = next(spool.rejected_dir.glob("*.reason.txt")).read_text()
    assert "prompt is 70000 bytes; column prompt text holds 65535" in reason


class FailingOutputs(OutputsStore):
    def __init__(self, root, failures: int):
        super().__init__(root)
        self.failures = failures

    def put(self, key, data):
        if key.endswith(".png") and self.failures > 0:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        return super().put(key, data)


def test_outputs_store_failure_keeps_the_image_in_the_spool_until_it_is_written(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    outputs = FailingOutputs(tmp_path / "outputs", failures=3)
    dispatcher = Dispatcher(Spool(tmp_path / "spool"), LocalTransport(RecordWriter(store, outputs).handle),
                            outputs, base_backoff_s=0.01, max_backoff_s=0.05)
    RecordSink(outputs, dispatcher)([record("no-space")])
    assert dispatcher.wait_idle(10)
    dispatcher.close(1)
    row = store.find("no-space", 0)
    assert base64.b64decode(row["image_base64"]) == b"\x89PNG\r\n\x1a\nno-space"
    assert outputs.get(row["image_key"]) == b"\x89PNG\r\n\x1a\nno-space"


def test_submit_never_raises_and_overflow_waits_on_disk(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    outputs = OutputsStore(tmp_path / "outputs")
    dispatcher = Dispatcher(Spool(tmp_path / "spool"), LocalTransport(RecordWriter(store, outputs).handle),
                            outputs, queue_size=3)
    sink = RecordSink(outputs, dispatcher)
    sink([{"request_id": "broken"}])  # a malformed record: logged, not raised into the request
    sink([record(f"o{i}") for i in range(20)])
    assert dispatcher.wait_idle(10)
    dispatcher.close(1)
    assert store.count() == 20


class DatabaseDown:
    max_event_bytes = None

    def deliver(self, body: bytes) -> None:
        raise ConnectionError("RDS unreachable")


def test_a_shared_spool_hands_a_recycled_instances_records_to_the_next_one(tmp_path):
    """FC: the spool is on the NAS. Instance A dies with records undelivered (database down, its image not yet in
    the outputs store); instance B adopts them once they are old enough and delivers them, but never takes the
    fresh entries of live instance C, and B's drain does not wait for C's records."""
    shared = tmp_path / "nas-spool"
    store = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    outputs = OutputsStore(tmp_path / "outputs")
    a = Dispatcher(Spool(shared, instance="c-a"), DatabaseDown(), FailingOutputs(tmp_path / "outputs", failures=99),
                   base_backoff_s=0.01, max_backoff_s=0.05)
    RecordSink(FailingOutputs(tmp_path / "outputs", failures=99), a)([record("from-a-1"), record("from-a-2")])
    time.sleep(0.2)
    assert not a.close(0.1)  # recycled with both records still on the NAS
    a_folder = shared / "instances" / "c-a"
    assert len(list(a_folder.glob("*.json"))) == 2 and len(list(a_folder.glob("*.img"))) == 2
    time.sleep(0.6)
    Spool(shared, instance="c-c").write({"request_id": "from-c"})  # a live instance's fresh entry

    b_spool = Spool(shared, instance="c-b", orphan_age_s=0.5)
    b = Dispatcher(b_spool, LocalTransport(RecordWriter(store, outputs).handle), outputs,
                   base_backoff_s=0.01, max_backoff_s=0.05)
    b.start()
    assert b.wait_idle(10) and b.close(1)
    for request_id in ("from-a-1", "from-a-2"):
        row = store.find(request_id, 0)
        assert base64.b64decode(row["image_base64"]) == b"\x89PNG\r\n\x1a\n" + request_id.encode()
    assert store.find("from-c", 0) is None and not a_folder.exists()
    assert len(Spool(shared, instance="c-c").names()) == 1 and b_spool.names() == []
