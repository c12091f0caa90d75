"""The loopback load test (bench/load.py): a short real run, and its exactly-once check on made-up records.

The short run is the bench itself (`python -m bench.load`, which starts `sdfc serve` on a free port):
2 clients × 5 s must end with 0 errors and every returned image stored exactly once. Bounded by the
subprocess timeout whatever the server does.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.load import check_exactly_once, percentile

REPO = Path(__file__).resolve().parent.parent


def test_two_clients_five_seconds_no_errors_every_image_stored_once(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.load", "--clients", "2", "--seconds", "5",
                          "--request-timeout", "20", "--settle-timeout", "20", "--ready-timeout", "30", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=90)
    assert (tmp_path / "load.json").exists(), out.stderr[-3000:]
    report = json.loads((tmp_path / "load.json").read_text())
    assert out.returncode == 0, (report["error_examples"], report["records"], out.stderr[-2000:])
    assert report["passed"] and report["totals"]["errors"] == 0
    routes = report["routes"]
    for route in ("txt2img", "img2img", "progress", "gallery list"):  # each client does each once first
        assert routes[route]["requests"] > 0 and routes[route]["p50_ms"] <= routes[route]["p99_ms"], route
    records = report["records"]
    assert records["ok"] and records["returned"] == records["rows"] == records["files"] == records["gallery_total"]
    assert records["returned"] > routes["txt2img"]["requests"] > 0  # the warm-up's image is checked too
    for when in ("start", "end"):
        assert report["server"][when]["rss_mib"] > 10 and report["server"][when]["open_fds"] > 3
    assert "| txt2img |" in (tmp_path / "load.md").read_text() and "| txt2img |" in out.stdout


def test_sdfc_bench_load_is_dispatched_to_the_load_test(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_run.main(["load", "--help"])
    assert exit_.value.code == 0 and "sdfc bench load" in capsys.readouterr().out


def _row(record_id, sha, file_sha="same"):
    return {"id": record_id, "sha256": sha, "file_sha256": sha if file_sha == "same" else file_sha}


def test_exactly_once_check_names_each_kind_of_failure():
    assert check_exactly_once(["a", "b"], [_row(1, "a"), _row(2, "b")], ["a", "b"], ["a"])["ok"]
    cases = {
        "missing": (["a", "b"], [_row(1, "a")], ["a", "b"], []),
        "stored_twice": (["a"], [_row(1, "a"), _row(2, "a")], ["a"], []),
        "extra_rows": (["a"], [_row(1, "a"), _row(2, "z")], ["a", "z"], []),
        "file_mismatch": (["a"], [_row(1, "a", file_sha=None)], ["a"], []),
        "files_not_once": (["a"], [_row(1, "a")], ["a", "a"], []),
        "returned_twice": (["a", "a"], [_row(1, "a")], ["a"], []),
        "downloads_never_returned": (["a"], [_row(1, "a")], ["a"], ["q"]),
    }
    for problem, arguments in cases.items():
        result = check_exactly_once(*arguments)
        assert not result["ok"] and result["counts"][problem] > 0, problem


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile([7.0], 0.99)) == (50.0, 99.0, 7.0)
    assert percentile([], 0.5) is None
