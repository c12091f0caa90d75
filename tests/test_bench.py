"""Smoke test of the benchmark: the sdfc worker on the committed tiny model, and the report's arithmetic.

No timing thresholds: this checks that the bench measures and reports, not how fast anything is.
"""
import json
import subprocess
import sys
from pathlib import Path

from bench import report
from bench.worker import FIRST_IMAGE, RESULT

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "models" / "tiny-sd"


def run_sdfc_worker(tmp_path: Path) -> tuple[list[str], dict]:
    image = tmp_path / "first.png"
    out = subprocess.run([sys.executable, "-m", "bench.worker", "--impl", "sdfc", "--model", str(TINY),
                          "--side", "64", "--runs", "1", "--image", str(image)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    results = [json.loads(line[len(RESULT):]) for line in lines if line.startswith(RESULT)]
    assert len(results) == 1, out.stdout
    return lines, results[0]


def test_sdfc_worker_reports_sane_measurements(tmp_path):
    lines, r = run_sdfc_worker(tmp_path)
    assert lines.index(FIRST_IMAGE) < len(lines) - 1, "the first-image mark must come before the result"
    assert (tmp_path / "first.png").stat().st_size > 0
    assert r["impl"] == "sdfc" and r["device"] == "cpu" and r["image_size"] == [64, 64]
    assert r["torch_imported"] is False
    for key in ("imports_s", "load_s", "first_image_s", "start_to_first_image_s"):
        assert 0 < r[key] < 120, key
    assert r["start_to_first_image_s"] >= r["imports_s"] + r["load_s"] + r["first_image_s"] - 0.01
    assert len(r["warm_s"]) == 1 and r["warm_median_s"] == r["warm_s"][0] > 0
    assert 10 < r["peak_rss_mib"] < 4096
    assert r["peak_rss_mib"] >= r["peak_rss_after_first_image_mib"] >= r["peak_rss_at_ready_mib"] > 10
    assert r["providers"] == ["CPUExecutionProvider"]
    assert r["ort_session"]["intra_op_num_threads"] == 0  # left on onnxruntime's default, and recorded


def test_ratios_and_verdicts():
    results = {"diffusers": {"cold_start_s": 10.0, "warm_median_s": 2.0, "peak_rss_mib": 1000.0},
               "sdfc": {"cold_start_s": 1.0, "warm_median_s": 1.8, "peak_rss_mib": 500.0}}
    rel = report.ratios(results)
    assert rel["diffusers"] == {"cold_start_s": 1.0, "warm_median_s": 1.0, "peak_rss_mib": 1.0}
    verdicts = report.verdicts("tiny", rel["sdfc"])
    assert verdicts["cold_start_s"]["verdict"] == "PASS"           # 0.1 <= 0.2
    assert verdicts["warm_median_s"]["verdict"] == "MISS"          # 0.9 > 0.8 on tiny
    assert report.verdicts("mid", rel["sdfc"])["warm_median_s"]["verdict"] == "PASS"  # 0.9 <= 1.0 on mid
    assert verdicts["peak_rss_mib"]["verdict"] == "MISS"           # 0.5 > 0.4
    assert report.ratios({"sdfc": {"cold_start_s": 1.0}})["sdfc"]["cold_start_s"] is None  # no baseline


def test_floors_say_what_no_start_up_or_memory_work_can_beat():
    results = {"diffusers": {"cold_start_s": 20.0, "peak_rss_mib": 1000.0},
               "sdfc": {"cold_start_s": 12.0, "first_image_s": 10.0, "peak_rss_mib": 500.0,
                        "peak_rss_at_ready_mib": 400.0}}
    floor = report.floors(results)
    assert floor == {"cold_start_s": 0.5, "peak_rss_mib": 0.4}
    verdicts = report.verdicts("mid", report.ratios(results)["sdfc"], floor)
    assert verdicts["cold_start_s"] == {"ratio": 0.6, "limit": 0.2, "verdict": "MISS", "floor": 0.5}
    assert verdicts["warm_median_s"]["floor"] is None
    table = "\n".join(report.targets_table({"mid": verdicts}))
    assert "0.60× ≤ 0.2× MISS (floor 0.50×)" in table and "0.50× ≤ 0.4× MISS (floor 0.40×)" in table
    assert report.floors({"sdfc": {"first_image_s": 1.0}})["cold_start_s"] is None  # no baseline
