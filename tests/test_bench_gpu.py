"""The one-call GPU proof (bench/gpu.py): its dry run on the CPU end to end, and its arithmetic.

The dry run builds the tiny model, exports it, runs diffusers and sdfc on the CPU and writes the report: what a
GPU run does, minus what needs a card. No timing thresholds: this checks that it measures and reports.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import gpu, gpu_worker

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.slow  # the dry run: about 2 minutes on 2 cores (two tiny exports)
def test_dry_run_runs_every_cpu_phase(dry_run):
    out, report, stdout = dry_run
    s = report["settings"]
    assert s["dry_run"] is True and s["device"] == "cpu" and s["size"] == "tiny" and s["steps"] == 2
    phases = report["phases"]
    for name in ("nv", "build", "diffusers", "export", "sdfc"):
        assert name in phases and "error" not in phases[name], (name, phases.get(name))
        assert phases[name]["wall_s"] > 0
        assert f"phase {name}: done" in stdout  # each phase's time is printed as it ends
    assert report["skipped"] == {}
    if report["export_target_cuda"]:  # the --target cuda export ran, and a plain one for the CPU to serve
        assert "error" not in phases["export_plain"] and phases["export"]["manifest"]
    assert report["total_s"] > 0 and report["machine"]["python"]
    assert (out / "log.txt").stat().st_size > 0


@pytest.mark.slow  # the dry run: about 2 minutes on 2 cores (two tiny exports)
def test_dry_run_measures_both_pipelines(dry_run):
    out, report, _ = dry_run
    for impl in ("diffusers", "sdfc"):
        r = report["phases"][impl]
        assert r["device"] == "cpu" and r["image_finite"] is True
        assert len(r["warm_s"]) == 1 and r["s_per_image"] == r["warm_s"][0] > 0
        assert r["steps_per_s"] > 0 and r["unet_call_s"] > 0
        assert r["load_s"] > 0 and r["ready_s"] >= r["load_s"]
        assert (out / f"{impl}.png").stat().st_size > 0
    sdfc = report["phases"]["sdfc"]
    assert sdfc["torch_imported"] is False  # the serving engine stays torch-free
    assert set(sdfc["providers"]) >= {"unet", "text_encoder", "vae_decoder"}
    assert all(p == ["CPUExecutionProvider"] for p in sdfc["providers"].values())
    assert report["phases"]["diffusers"]["attention_processor"] == "AttnProcessor2_0"  # SDPA
    assert report["derived"]["by_impl"]["diffusers"]["s_per_image_vs_diffusers"] == 1.0


@pytest.mark.slow  # the dry run: about 2 minutes on 2 cores (two tiny exports)
def test_dry_run_counts_the_unet_flops_as_torch_does(dry_run):
    _, report, _ = dry_run
    built = report["phases"]["build"]
    flops = built["unet_flops"]
    assert built["unet_parameters"] == flops["parameters"] > 0 and built["dtype"] == "fp16"
    assert flops["total_flops"] == flops["conv_flops"] + flops["linear_flops"] + flops["attention_flops"]
    # torch's FLOP counter on the CPU has no formula for SDPA's CPU kernel: everything else must agree exactly.
    counted = report["phases"]["diffusers"]["torch_flop_counter"]
    assert counted == flops["conv_flops"] + flops["linear_flops"]
    assert report["derived"]["unet_flops_per_step"] == flops["total_flops"]
    assert report["derived"]["card_peak_fp16"]["tflops"] is None  # no card, no floor


@pytest.mark.slow  # the dry run: about 2 minutes on 2 cores (two tiny exports)
def test_dry_run_noise_control_and_skipped_cuda_check(dry_run):
    _, report, _ = dry_run
    nv = report["phases"]["nv"]
    assert nv["cpu_control"]["all_bit_identical"] is True and nv["cpu_control"]["total_cases"] == 15
    assert "no CUDA" in nv["nv_vs_cuda"]["skipped"]


@pytest.mark.slow  # the dry run: about 2 minutes on 2 cores (two tiny exports)
def test_dry_run_export_and_report(dry_run):
    out, report, stdout = dry_run
    export = report["phases"]["export"]
    assert export["manifest"]["precision"] == "fp16" and export["component_mib"]["unet"] >= 0
    assert report["served_export"].startswith("plain fp16")
    text = (out / "results.md").read_text()
    assert text in stdout
    assert "| impl | s/image |" in text and "| diffusers |" in text and "| sdfc |" in text
    assert "NV noise vs torch.randn on CUDA: skipped" in text and "15/15 cases bit-identical" in text


def test_phases_run_side_by_side_and_report_failures(tmp_path):
    run = gpu.Run(tmp_path, tmp_path / "work", gpu.Settings.for_run(True, None, None))
    code = "import json, time; time.sleep(0.5); print(%r + json.dumps({'x': 1}))" % gpu_worker.RESULT
    ok = [sys.executable, "-c", code]
    bad = [sys.executable, "-c", "import sys; print('broken', file=sys.stderr); sys.exit(3)"]
    first, second = run.start("export", ok), run.start("diffusers", bad)
    assert first.proc.poll() is None  # both started before either is waited for
    assert run.finish(second) is None and run.finish(first) == {"x": 1, "wall_s": pytest.approx(0.5, abs=5)}
    failed = run.report["phases"]["diffusers"]
    assert "exited with 3" in failed["error"] and failed["log_tail"] == ["broken"]
    assert "broken" in (tmp_path / "log.txt").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["phases"]["export"]["x"] == 1


class RecordingRun(gpu.Run):
    """A GPU run's orchestration with no processes: records each phase's start, as run_all asks for it."""

    def __init__(self, tmp_path, failing=None):
        super().__init__(tmp_path, tmp_path / "work", gpu.Settings.for_run(False, None, None))
        self.report["machine"]["gpus"] = ["NVIDIA H200"]
        self.failing, self.events = failing or {}, []

    def start(self, name, command, env=None, worker=True, cpus=None, reserve_s=0):
        self.events.append(("start", name, {"command": command, "env": env or {}, "cpus": cpus,
                                            "reserve_s": reserve_s}))
        return name

    def finish(self, pending):
        self.events.append(("finish", pending, None))
        entry = {"error": self.failing[pending], "wall_s": 1.0} if pending in self.failing else {"wall_s": 1.0}
        self.report["phases"][pending] = entry
        return None if "error" in entry else entry

    def start_of(self, name):
        return next(info for kind, n, info in self.events if kind == "start" and n == name)


@pytest.fixture
def gpu_machine(monkeypatch):
    monkeypatch.setattr(gpu, "export_target_cuda_supported", lambda: True)
    monkeypatch.setattr(gpu, "split_cpus", lambda: ([0, 1, 2, 3], list(range(4, 16))))
    monkeypatch.setattr(gpu, "nvidia_library_dirs", lambda: ["/site/nvidia/cu13/lib", "/site/nvidia/cudnn/lib"])


def test_gpu_run_exports_beside_diffusers_and_serves_the_cuda_export(tmp_path, gpu_machine):
    run = RecordingRun(tmp_path)
    gpu.run_all(run)
    order = [(kind, name) for kind, name, _ in run.events]
    assert order == [("start", "build"), ("finish", "build"), ("start", "export"), ("start", "nv"),
                     ("finish", "nv"), ("start", "diffusers"), ("finish", "diffusers"), ("finish", "export"),
                     ("start", "sdfc"), ("finish", "sdfc")]  # the export (the long pole) starts first
    export, diffusers, sdfc = run.start_of("export"), run.start_of("diffusers"), run.start_of("sdfc")
    assert export["command"][-2:] == ["--target", "cuda"] and "--precision" in export["command"]
    assert export["cpus"] == list(range(4, 16)) and export["env"]["OMP_NUM_THREADS"] == "12"
    assert export["env"]["CUDA_VISIBLE_DEVICES"] == ""  # the export cannot touch the card measured beside it
    assert export["reserve_s"] == gpu.SDFC_RESERVE_S
    assert diffusers["cpus"] == sdfc["cpus"] == [0, 1, 2, 3]  # both pipelines on the same few CPUs
    assert sdfc["env"]["SDFC_REQUIRE_CUDA"] == "1"
    assert sdfc["env"]["LD_LIBRARY_PATH"].startswith("/site/nvidia/cu13/lib:/site/nvidia/cudnn/lib")
    args = json.loads(sdfc["command"][-1])
    assert args["device"] == "cuda" and args["side"] == 512 and args["steps"] == 20
    assert args["model"] == str(tmp_path / "work" / "models")
    assert run.report["served_export"] == "--target cuda" and run.report["export_beside_diffusers"] is True


def test_gpu_run_falls_back_to_a_plain_export(tmp_path, gpu_machine):
    run = RecordingRun(tmp_path, failing={"export": "exited with 1"})
    gpu.run_all(run)
    plain = run.start_of("export_plain")
    assert "--target" not in plain["command"]
    assert json.loads(run.start_of("sdfc")["command"][-1])["model"] == str(tmp_path / "work" / "models-plain")
    assert run.report["served_export"].startswith("plain fp16 (the --target cuda export failed)")


def test_gpu_run_whose_export_ran_out_of_time_skips_sdfc(tmp_path, gpu_machine):
    run = RecordingRun(tmp_path, failing={"export": "timed out after 310 s"})
    gpu.run_all(run)
    started = [name for kind, name, _ in run.events if kind == "start"]
    assert "export_plain" not in started and "sdfc" not in started  # a plain export would not fit either
    assert "export failed" in run.report["skipped"]["sdfc"]


def test_gpu_run_whose_build_failed_still_checks_the_noise(tmp_path, gpu_machine):
    run = RecordingRun(tmp_path, failing={"build": "exited with 1"})
    gpu.run_all(run)
    assert [name for kind, name, _ in run.events if kind == "start"] == ["build", "nv"]
    assert set(run.report["skipped"]) == {"diffusers", "export", "sdfc"}


def test_gpu_run_without_export(tmp_path, gpu_machine):
    run = RecordingRun(tmp_path)
    gpu.run_all(run, export=False)
    assert [name for kind, name, _ in run.events if kind == "start"] == ["build", "nv", "diffusers"]
    assert set(run.report["skipped"]) == {"export", "sdfc"}


def test_split_cpus(monkeypatch):
    monkeypatch.setattr(gpu.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert gpu.split_cpus() == ([0, 1, 2, 3], list(range(4, 16)))
    monkeypatch.setattr(gpu.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert gpu.split_cpus() == (None, None)  # too few to share: the export runs alone


def test_compare_bits_counts_ulps():
    a = np.array([1.0, -2.0, 0.5], np.float32)
    assert gpu_worker.compare_bits(a, a.copy())["bit_identical"] is True
    b = a.copy()
    b[1] = np.nextafter(b[1], np.float32(0))  # one ULP towards zero, on a negative value
    got = gpu_worker.compare_bits(a, b)
    assert got["equal_elements"] == 2 and got["max_ulp_diff"] == 1 and not got["bit_identical"]
    assert gpu_worker.compare_bits(a, a[:2])["bit_identical"] is False  # shapes differ


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA H100 80GB HBM3", 989.5),
    ("NVIDIA H100 PCIe", 756.5), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA L4", 121.0),
    ("Tesla T4", 65.0), ("NVIDIA A10G", None), ("NVIDIA L40S", None), (None, None)])
def test_card_peak_table(name, tflops):
    assert gpu.card_peak(name)["tflops"] == tflops


def test_fraction_of_peak_arithmetic():
    report = {"settings": {"device": "cuda"}, "machine": {"gpus": ["NVIDIA H200"]}, "phases": {
        "build": {"unet_flops": {"total_flops": 1.6e12}},
        "diffusers": {"s_per_image": 2.0, "unet_call_s": 0.04, "steps_per_s": 20.0},
        "sdfc": {"s_per_image": 1.0, "unet_call_s": 0.032, "steps_per_s": 25.0}}}
    d = gpu.derive(report)
    assert d["compute_floor_s_per_step"] == pytest.approx(1.6e12 / 989.5e12, abs=1e-5)
    assert d["by_impl"]["sdfc"]["s_per_image_vs_diffusers"] == 0.5
    assert d["by_impl"]["diffusers"]["unet_tflops_achieved"] == 40.0
    assert d["by_impl"]["sdfc"]["unet_tflops_achieved"] == 50.0
    assert d["by_impl"]["sdfc"]["unet_fraction_of_peak"] == pytest.approx(50 / 989.5, abs=1e-4)
    assert d["by_impl"]["diffusers"]["step_tflops_achieved"] == 32.0


def test_no_gpu_skips_the_card_phases_with_their_reason(tmp_path, monkeypatch):
    run = gpu.Run(tmp_path, tmp_path / "work", gpu.Settings.for_run(False, None, None))
    run.report["machine"]["gpus"] = []
    ran = []
    monkeypatch.setattr(run, "worker", lambda name, *a, **k: ran.append(name) or {})
    gpu.run_all(run)
    assert ran == ["nv"]  # the noise check still runs (and says itself whether CUDA was there)
    assert set(run.report["skipped"]) == {"build", "diffusers", "export", "sdfc"}
    assert all("no GPU" in reason for reason in run.report["skipped"].values())
    run.report["derived"] = gpu.derive(run.report)
    assert "skipped: no GPU" in gpu.markdown(run.report)


def test_sdfc_phase_without_cuda_provider_is_skipped_with_reason():
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    got = gpu_worker.phase_sdfc({"device": "cuda"})
    assert "no CUDAExecutionProvider" in got["skipped"] and "onnxruntime-gpu" in got["skipped"]


def test_sdfc_bench_device_cuda_routes_to_the_gpu_proof(monkeypatch):
    from bench import run as bench_run
    seen = []
    monkeypatch.setattr(gpu, "main", lambda argv: seen.append(argv) or 0)
    assert bench_run.main(["--device", "cuda", "--dry-run", "--out", "X"]) == 0
    assert bench_run.main(["--out", "Y", "--device=cuda"]) == 0
    assert seen == [["--dry-run", "--out", "X"], ["--out", "Y"]]
    assert bench_run._gpu_proof_argv(["--device", "cpu"]) is None
