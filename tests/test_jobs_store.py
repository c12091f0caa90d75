"""The task store on both backends (SQLite and a throwaway MariaDB database): creation and in-place upgrade,
idempotent submits, claims that only one instance wins, cancel, progress, leases that expire."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from sdfc.pricing import Pricing
from sdfc.jobs.store import TaskStore
from sdfc.records import RecordRejected, open_store

from . import mariadb


@pytest.fixture(scope="module")
def mysql_db():
    with mariadb.temp_database() as name:
        yield name


@pytest.fixture(params=["sqlite", "mysql"])
def tasks(request, tmp_path, mysql_db):
    if request.param == "sqlite":
        records = open_store(f"sqlite:///{tmp_path / 'records.db'}")
    else:
        mariadb.fetch(mysql_db, "DROP TABLE IF EXISTS generation_tasks")
        records = open_store(mariadb.url(mysql_db))
    yield TaskStore(records)
    records.close()


def test_submit_read_and_list_newest_first(tasks):
    a, created = tasks.create("t-a", "txt2img", "alice", "tasks/a/request.json", now=100.0)
    assert created and a["status"] == "queued" and a["user"] == "alice" and a["attempts"] == 0
    tasks.create("t-b", "img2img", "bob", "tasks/b/request.json", now=101.0)
    tasks.create("t-c", "txt2img", "alice", "tasks/c/request.json", now=102.0)
    page = tasks.list("alice", None, 1, 10)
    assert page.total == 2 and [t["id"] for t in page.rows] == ["t-c", "t-a"]
    everyone = tasks.list(None, None, 1, 2)
    assert everyone.total == 3 and [t["id"] for t in everyone.rows] == ["t-c", "t-b"]
    assert [t["id"] for t in tasks.list(None, None, 2, 2).rows] == ["t-a"]
    assert tasks.list(None, "running", 1, 10).total == 0
    assert tasks.pending_ids() == ["t-a", "t-b", "t-c"]
    assert tasks.queue_position(tasks.get("t-c")) == 2


def test_idempotency_key_returns_the_same_task_per_user(tasks):
    first, created = tasks.create("t-1", "txt2img", "alice", "k1", idempotency_key="retry-7")
    again, created_again = tasks.create("t-2", "txt2img", "alice", "k2", idempotency_key="retry-7")
    assert created and not created_again and again["id"] == "t-1"
    other, created_other = tasks.create("t-3", "txt2img", "bob", "k3", idempotency_key="retry-7")
    assert created_other and other["id"] == "t-3"  # keys are per user
    with pytest.raises(RecordRejected):
        tasks.create("t-1", "txt2img", "alice", "k4")  # a reused task id never replaces a task


def test_only_one_instance_wins_a_claim(tasks):
    tasks.create("t-race", "txt2img", "alice", "k")
    wins = []
    barrier = threading.Barrier(6)

    def claim(n):
        barrier.wait()
        if tasks.claim("t-race", f"instance-{n}", lease_s=30):
            wins.append(n)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    task = tasks.get("t-race")
    assert task["status"] == "running" and task["instance"] == f"instance-{wins[0]}" and task["attempts"] == 1


def test_claim_next_is_fifo_and_progress_is_recorded(tasks):
    tasks.create("t-1", "txt2img", "alice", "k1", now=10.0)
    tasks.create("t-2", "txt2img", "alice", "k2", now=11.0)
    first = tasks.claim_next("me", lease_s=30)
    assert first["id"] == "t-1"
    assert tasks.heartbeat("t-1", "me", 30, step=3, steps=10, progress=0.3, eta=1.5) is False
    row = tasks.get("t-1")
    assert (row["step"], row["steps"], row["progress"], row["eta"]) == (3, 10, 0.3, 1.5)
    # Another instance cannot write this task's progress or finish it.
    tasks.heartbeat("t-1", "someone-else", 30, step=9, steps=10, progress=0.9, eta=0.1)
    assert tasks.get("t-1")["step"] == 3
    assert not tasks.finish("t-1", "someone-else", "succeeded")
    assert tasks.finish("t-1", "me", "succeeded", result_key="r", gpu_seconds=2.5,
                        cost=Pricing().cost(2.5))
    done = tasks.get("t-1")
    assert done["status"] == "succeeded" and done["progress"] == 1 and done["gpu_seconds"] == 2.5
    assert done["cost"] == pytest.approx(2.5 * 84.8 * 0.00002)
    assert tasks.claim_next("me", lease_s=30)["id"] == "t-2"
    assert tasks.claim_next("me", lease_s=30) is None


def test_cancel_queued_at_once_and_flag_running(tasks):
    tasks.create("q", "txt2img", "alice", "k1", now=1.0)
    tasks.create("r", "txt2img", "alice", "k2", now=2.0)
    assert tasks.claim("r", "me", 30)
    assert tasks.cancel("q") == "cancelled"
    assert tasks.claim("q", "me", 30) is False  # a cancelled task never runs
    assert tasks.cancel("r") == "running"
    assert tasks.heartbeat("r", "me", 30, 1, 10, 0.1, None) is True  # the instance sees the flag
    assert tasks.finish("r", "me", "cancelled", result_key="r.json")
    assert tasks.get("r")["status"] == "cancelled"


def test_expired_lease_requeues_unstarted_and_fails_started(tasks):
    tasks.create("never-sampled", "txt2img", "alice", "k1", now=1.0)
    tasks.create("half-done", "txt2img", "alice", "k2", now=2.0)
    assert tasks.claim("never-sampled", "dead", lease_s=5, now=100.0)
    assert tasks.claim("half-done", "dead", lease_s=5, now=100.0)
    tasks.heartbeat("half-done", "dead", 5, step=4, steps=20, progress=0.2, eta=9, now=101.0)
    assert tasks.reap(now=104.0) == []  # leases still valid
    assert sorted(tasks.reap(now=107.0)) == ["half-done", "never-sampled"]
    failed = tasks.get("half-done")
    assert failed["status"] == "failed" and "dead" in failed["error"] and "lease expired" in failed["error"]
    again = tasks.get("never-sampled")
    assert again["status"] == "queued" and again["instance"] is None
    # Run again once; a second death before sampling is final.
    assert tasks.claim("never-sampled", "dead-too", lease_s=5, now=200.0)
    assert tasks.reap(now=300.0) == ["never-sampled"]
    assert tasks.get("never-sampled")["status"] == "failed"
    # The dead instance's late finish cannot overwrite the verdict.
    assert not tasks.finish("half-done", "dead", "succeeded")


def test_an_older_table_gains_missing_columns_in_place(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE generation_tasks (id TEXT PRIMARY KEY, type TEXT, user TEXT, status TEXT, '
                 'created_at REAL)')
    conn.execute("INSERT INTO generation_tasks VALUES ('old', 'txt2img', 'alice', 'succeeded', 5.0)")
    conn.commit()
    conn.close()
    store = TaskStore(open_store(f"sqlite:///{path}"))
    old = store.get("old")
    assert old["status"] == "succeeded" and old["cost"] is None and "lease_until" in old
    store.create("new", "txt2img", "alice", "k")
    assert store.list("alice", None, 1, 10).total == 2


def test_mysql_table_is_created_and_upgraded_in_place(mysql_db):
    mariadb.fetch(mysql_db, "DROP TABLE IF EXISTS generation_tasks")
    mariadb.fetch(mysql_db, "CREATE TABLE generation_tasks (id varchar(64) PRIMARY KEY, type varchar(16), "
                            "user varchar(128), status varchar(16), created_at double)")
    mariadb.fetch(mysql_db, "INSERT INTO generation_tasks VALUES ('old', 'txt2img', 'alice', 'failed', 1.0)")
    records = open_store(mariadb.url(mysql_db))
    store = TaskStore(records)
    assert store.get("old")["status"] == "failed"
    cols = {c["COLUMN_NAME"] for c in mariadb.fetch(
        mysql_db, "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND "
                  "TABLE_NAME = 'generation_tasks'", (mysql_db,))}
    assert {"lease_until", "gpu_seconds", "cost", "cancel_requested", "idempotency_key"} <= cols
    keys = mariadb.fetch(mysql_db, "SHOW INDEX FROM generation_tasks WHERE Key_name = "
                                   "'uq_generation_tasks_idempotency'")
    assert [k["Column_name"] for k in keys] == ["user", "idempotency_key"] and keys[0]["Non_unique"] == 0
    records.close()
