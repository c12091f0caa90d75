"""The one-call GPU proof: sdfc against diffusers (PyTorch fp16, SDPA) on the same card, in one command.

    python -m bench.gpu [--out DIR] [--dry-run]        (also: sdfc bench --device cuda [--out DIR] [--dry-run])

On a GPU machine with no network: builds SD 1.5's architecture at full size with random weights (UNet 860 M) in
fp16 on the card, exports it with `sdfc export diffusers --precision fp16 --target cuda` (plain fp16 where this
version has no --target), and measures diffusers and sdfc at 512x512, 20 Euler steps, batch 1, CFG 7: s/image,
sampling steps/s, one UNet call, session creation + warm-up, peak GPU memory, and the share of the card's dense
fp16 tensor peak the UNet reaches. Also checks sdfc's NV noise against torch.randn on a CUDA generator, bit for
bit. Writes results.json and results.md (plus the first images and one log) under --out.

Each phase runs in its own process (bench/gpu_worker.py), one after the other, so that the card's memory is
each phase's own; this parent imports neither torch nor onnxruntime. What cannot run is skipped with its reason
(no GPU, no onnxruntime-gpu, out of time); the JSON is rewritten after every phase, so a run cut short still
leaves what it measured. `--dry-run` runs every phase a CPU can (the tiny model, 64x64, 2 steps) for CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import machine
from .gpu_worker import RESULT
from .models import FIXTURE_TOKENIZER, REPO

# No hub lookups or telemetry: the GPU machines have no network, and a timeout must never be timed.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1",
               "DIFFUSERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
MODEL_NAME = "bench-gpu"
BUILD_SEED = 0

# Dense (no structured sparsity) fp16 tensor-core peak per card, TFLOP/s, matched on nvidia-smi's name in
# this order. Sources: NVIDIA's datasheets, which quote the sparse figure; dense is half of it.
PEAK_FP16_TFLOPS = (
    (r"\bH200 NVL\b", 835.5, "H200 NVL datasheet: FP16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"\bH200\b", 989.5, "H200 SXM datasheet: FP16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"\bH100 NVL\b", 835.5, "H100 NVL datasheet: FP16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"\bH100 PCIe\b", 756.5, "H100 PCIe datasheet: FP16 Tensor Core 1,513 TFLOPS with sparsity"),
    (r"\bH100\b", 989.5, "H100 SXM datasheet: FP16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"\bA100\b", 312.0, "A100 datasheet: FP16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    (r"\bA10\b", 125.0, "A10 datasheet: FP16 Tensor Core 125 TFLOPS (250 with sparsity)"),
    (r"\bL4\b", 121.0, "L4 datasheet: FP16 Tensor Core 242 TFLOPS with sparsity"),
    (r"\bT4\b", 65.0, "T4 datasheet: mixed-precision (FP16/FP32) 65 TFLOPS"),
)


def gpu_details() -> list[dict]:
    """Each card's name, driver, memory and compute capability as nvidia-smi reports them ([] without one)."""
    fields = ("name", "driver_version", "memory.total", "compute_cap")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in out.stdout.splitlines() if line.strip()]


def card_peak(gpu_name: str | None) -> dict:
    """{"tflops": dense fp16 peak or None, "source": where the figure comes from} for nvidia-smi's name."""
    for pattern, tflops, source in PEAK_FP16_TFLOPS:
        if gpu_name and re.search(pattern, gpu_name):
            return {"gpu": gpu_name, "tflops": tflops, "source": source}
    return {"gpu": gpu_name, "tflops": None, "source": "card not in bench/gpu.py's table" if gpu_name else "no GPU"}


@dataclass(frozen=True)
class Settings:
    size: str
    side: int
    steps: int
    runs: int
    unet_calls: int
    device: str
    dtype: str
    budget_s: float
    dry_run: bool

    @classmethod
    def for_run(cls, dry_run: bool, runs: int | None, budget_s: float | None) -> "Settings":
        if dry_run:  # every phase a CPU can run, in CI's time
            return cls("tiny", 64, 2, runs or 1, 2, "cpu", "fp16", budget_s or 900, True)
        return cls("sd15", 512, 20, runs or 3, 10, "cuda", "fp16", budget_s or 470, False)


# Each phase's time limit, cut to what is left of the whole run's budget (seconds).
PHASE_LIMITS = {"nv": 120, "build": 240, "diffusers": 240, "export": 420, "export_plain": 420, "sdfc": 300}


@dataclass
class Pending:
    """A phase's process, started and not yet waited for."""
    name: str
    command: list[str]
    proc: subprocess.Popen
    started: float
    limit: float
    stdout: Path
    stderr: Path
    worker: bool
    cpus: list[int] | None


class Run:
    """The run's state: the settings, each phase's result, the log, and the JSON rewritten after every phase."""

    def __init__(self, out: Path, work: Path, settings: Settings):
        self.out, self.work, self.settings = out, work, settings
        self.started, self.t0 = datetime.now(timezone.utc), time.monotonic()
        self.log = out / "log.txt"
        self.log.write_text("")
        self.report: dict = {"started": self.started.strftime("%Y-%m-%d %H:%M UTC"), "settings": asdict(settings),
                             "machine": {**machine.describe(), "gpu_details": gpu_details()}, "phases": {},
                             "skipped": {}}

    def remaining_s(self) -> float:
        return self.settings.budget_s - (time.monotonic() - self.t0)

    def start(self, name: str, command: list[str], env: dict | None = None, worker: bool = True,
              cpus: list[int] | None = None, reserve_s: float = 0) -> Pending | None:
        """Start one phase's process (on `cpus` only, when given); None (and a skip) when no time is left.
        `reserve_s` keeps that much of the budget for the phases after this one."""
        limit = min(PHASE_LIMITS[name], self.remaining_s() - reserve_s)
        if limit < 20:
            return self.skip(name, f"out of the run's time budget ({self.settings.budget_s:.0f} s)")
        _say(f"phase {name}: starting (limit {limit:.0f} s" + (f", CPUs {_ranges(cpus)})" if cpus else ")"))
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        stdout, stderr = self.work / "logs" / f"{name}.out", self.work / "logs" / f"{name}.err"
        with stdout.open("w") as out_file, stderr.open("w") as err_file:
            proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **OFFLINE_ENV, **(env or {})},
                                    stdout=out_file, stderr=err_file, preexec_fn=_pin(cpus))
        return Pending(name, command, proc, time.monotonic(), limit, stdout, stderr, worker, cpus)

    def finish(self, pending: Pending | None) -> dict | None:
        """Wait for a started phase; its result (or its error) lands in the report. None when it failed."""
        if pending is None:
            return None
        try:
            code = pending.proc.wait(timeout=max(1.0, pending.limit - (time.monotonic() - pending.started)))
        except subprocess.TimeoutExpired:
            pending.proc.kill()
            pending.proc.wait()
            code = None
        wall = round(time.monotonic() - pending.started, 2)
        stdout = pending.stdout.read_text(errors="replace")
        with self.log.open("a") as log:
            log.write(f"\n===== phase {pending.name}: {' '.join(pending.command)}\n")
            log.write(_last_bytes(pending.stderr))  # capped: the log must come back from a GPU machine's $OUT
            log.write(stdout)
        lines = [line for line in stdout.splitlines() if line.startswith(RESULT)]
        if code is None:
            entry = {"error": f"timed out after {pending.limit:.0f} s (see {self.log.name})"}
        elif code != 0 or (pending.worker and not lines):
            entry = {"error": f"exited with {code} (see {self.log.name})", "log_tail": _tail(pending.stderr)}
        else:
            entry = json.loads(lines[-1][len(RESULT):]) if lines else {}
        entry["wall_s"] = wall
        if pending.cpus:
            entry["cpus"] = _ranges(pending.cpus)
        self.report["phases"][pending.name] = entry
        _say(f"phase {pending.name}: {'error: ' + entry['error'] if 'error' in entry else 'done'} in {wall:.1f} s")
        self.save()
        return None if "error" in entry else entry

    def phase(self, name: str, command: list[str], env: dict | None = None, worker: bool = True,
              cpus: list[int] | None = None) -> dict | None:
        return self.finish(self.start(name, command, env, worker, cpus))

    def worker(self, name: str, phase: str, args: dict, env: dict | None = None,
               cpus: list[int] | None = None) -> dict | None:
        return self.phase(name, worker_command(phase, args), env, cpus=cpus)

    def skip(self, name: str, reason: str) -> None:
        self.report["skipped"][name] = reason
        _say(f"phase {name}: skipped: {reason}")
        self.save()
        return None

    def save(self) -> None:
        self.report["total_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "results.json").write_text(json.dumps(self.report, indent=2) + "\n")


def worker_command(phase: str, args: dict) -> list[str]:
    return [sys.executable, "-m", "bench.gpu_worker", phase, "--json", json.dumps(args)]


def _pin(cpus: list[int] | None):
    if not cpus:
        return None

    def apply() -> None:
        try:
            os.sched_setaffinity(0, cpus)
        except (AttributeError, OSError):
            pass  # no affinity here: the phase runs unpinned
    return apply


def _ranges(cpus: list[int]) -> str:
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])


def split_cpus(minimum: int = 8, measured: int = 4) -> tuple[list[int] | None, list[int] | None]:
    """(CPUs for the measured pipelines, CPUs for the export beside them) on a machine with `minimum` usable CPUs
    or more; (None, None) on a smaller one, where the export runs alone. A GPU pipeline needs few host CPUs (an
    FC GPU instance has few): both pipelines get the same `measured` ones, the export the rest."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(usable) < minimum:
        return None, None
    return usable[:measured], usable[measured:]


def _say(text: str) -> None:
    print(f"[bench.gpu {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _last_bytes(path: Path, limit: int = 2 ** 20) -> str:
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        text = f.read().decode(errors="replace")
    return (f"[... {size - limit} bytes left out ...]\n" if size > limit else "") + text


def _tail(path: Path, lines: int = 8) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:]


def export_target_cuda_supported() -> bool:
    """Whether this version's `sdfc export diffusers` has `--target cuda` (the ORT transformer-optimizer pass)."""
    proc = subprocess.run([sys.executable, "-m", "sdfc.cli", "export", "diffusers", "--help"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    help_text = proc.stdout + proc.stderr
    return bool(re.search(r"--target\b", help_text)) and "cuda" in help_text


def export_command(src: Path, dst: Path, target_cuda: bool) -> list[str]:
    return [sys.executable, "-m", "sdfc.cli", "export", "diffusers", str(src), "--out", str(dst), "--name",
            MODEL_NAME, "--precision", "fp16", "--no-validate", *(["--target", "cuda"] if target_cuda else [])]


def describe_export(folder: Path) -> dict:
    """What the export wrote: the manifest's precision entries and each component's size on disk."""
    manifest_path = folder / "sdfc.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) // 2 ** 20
             for p in sorted(folder.iterdir()) if p.is_dir()} if folder.is_dir() else {}
    keep = ("precision", "component_precision", "fp32_fallback", "target", "graph_optimization", "fused_ops",
            "exporter")
    return {"manifest": {k: v for k, v in manifest.items() if k in keep or "target" in k or "optimi" in k},
            "component_mib": sizes}


def nvidia_library_dirs() -> list[str]:
    """The lib folders of the nvidia-* wheels (CUDA runtime, cuBLAS, cuDNN...) that torch brought: where
    onnxruntime-gpu finds CUDA on a machine whose CUDA comes from pip. Found by path, without importing torch."""
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    found = []
    for root in dict.fromkeys(r for r in roots if r and Path(r).is_dir()):
        for lib in sorted(Path(root).glob("nvidia/*/lib")):
            if any(lib.glob("*.so*")) and str(lib) not in found:
                found.append(str(lib))
    return found


SDFC_RESERVE_S = 100  # of the budget, kept for the sdfc phase while the export runs (GPU runs)


def run_all(run: Run, export: bool = True, concurrent: bool = True) -> None:
    s, work, out = run.settings, run.work, run.out
    gpus = run.report["machine"]["gpus"]
    on_gpu = s.device == "cuda"
    # On a card the noise check waits until the export has started beside it: the export is the long pole.
    nv_first = not (on_gpu and gpus)
    if nv_first:
        run.worker("nv", "nv", {})
    if on_gpu and not gpus:
        for name in ("build", "diffusers", "export", "sdfc"):
            run.skip(name, "no GPU: nvidia-smi lists none (run with --dry-run on a CPU machine)")
        return
    diffusers_dir, models_dir = work / "diffusers", work / "models"
    built = run.worker("build", "build", {"out": str(diffusers_dir), "size": s.size, "seed": BUILD_SEED,
                                          "device": s.device, "dtype": s.dtype, "batch": 1, "side": s.side,
                                          "tokenizer_from": str(FIXTURE_TOKENIZER)})
    if built is None:
        if not nv_first:
            run.worker("nv", "nv", {})
        for name in ("diffusers", "export", "sdfc"):
            run.skip(name, "the model could not be built (phase build failed)")
        return
    bench_args = {"side": s.side, "steps": s.steps, "runs": s.runs, "unet_calls": s.unet_calls,
                  "device": s.device}
    target_cuda = export and export_target_cuda_supported()
    run.report["export_target_cuda"] = target_cuda
    if export and not target_cuda:
        run.report["export_note"] = "this version of `sdfc export` has no --target cuda: plain fp16 export"
    served = models_dir / MODEL_NAME
    # On a GPU machine with CPUs to spare, the export (CPU work) runs beside the diffusers phase (GPU work) on
    # other CPUs: the 8-minute budget holds, and both pipelines are measured on the same few CPUs.
    measured_cpus, export_cpus = split_cpus() if on_gpu and concurrent else (None, None)
    # The export needs no card; hidden from it, it cannot touch the memory measured beside it.
    export_env = {**({"CUDA_VISIBLE_DEVICES": ""} if on_gpu else {}),
                  **({"OMP_NUM_THREADS": str(len(export_cpus))} if export_cpus else {})}
    reserve = SDFC_RESERVE_S if on_gpu else 0

    def start_export():
        return run.start("export", export_command(diffusers_dir, served, target_cuda), export_env, worker=False,
                         cpus=export_cpus, reserve_s=reserve)

    beside = bool(export and export_cpus)
    pending = start_export() if beside else None
    run.report["export_beside_diffusers"] = pending is not None
    if not nv_first:
        run.worker("nv", "nv", {}, cpus=measured_cpus)
    run.worker("diffusers", "diffusers", {**bench_args, "model": str(diffusers_dir), "dtype": s.dtype,
                                          "image": str(out / "diffusers.png")}, cpus=measured_cpus)
    if not export:
        run.skip("export", "--no-export")
        run.skip("sdfc", "--no-export: no model for sdfc")
        return
    exported = run.finish(pending if beside else start_export())
    if exported is not None:
        exported.update(describe_export(served))
        run.save()
    timed_out = "timed out" in (run.report["phases"].get("export") or {}).get("error", "")
    # The CPU cannot run a GPU-optimized graph's CUDA-only fused operators: the dry run serves a plain export
    # and only proves that the --target cuda one completes. On a GPU a failed --target cuda falls back to plain
    # (not one that ran out of time: a plain export would not fit either).
    if target_cuda and ((exported is None and not timed_out) or not on_gpu):
        plain_models = work / "models-plain"
        plain = run.phase("export_plain", export_command(diffusers_dir, plain_models / MODEL_NAME, False),
                          worker=False)
        models_dir, exported = plain_models, plain
        if plain is not None:
            plain.update(describe_export(plain_models / MODEL_NAME))
            run.report["served_export"] = "plain fp16" + (
                " (the --target cuda export failed)" if on_gpu else
                " served (the CPU has no kernels for --target cuda's fused ops; that export ran as phase export)")
    else:
        run.report["served_export"] = "--target cuda" if target_cuda else "plain fp16"
    if exported is None:
        run.skip("sdfc", "no exported model (phase export failed)")
        return
    env = {}
    if on_gpu:
        libs = nvidia_library_dirs()
        env = {"SDFC_REQUIRE_CUDA": "1",
               "LD_LIBRARY_PATH": os.pathsep.join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)}
    result = run.worker("sdfc", "sdfc", {**bench_args, "model": str(models_dir), "image": str(out / "sdfc.png")},
                        env, cpus=measured_cpus)
    if result and "skipped" in result:
        run.report["phases"].pop("sdfc")
        run.skip("sdfc", result["skipped"])


# --- derived figures and the Markdown report --------------------------------------------------------------

def derive(report: dict) -> dict:
    """Ratios to diffusers and the share of the card's fp16 peak, from the phases' raw results."""
    phases = report["phases"]
    flops = (phases.get("build") or {}).get("unet_flops", {}).get("total_flops")
    gpu = next(iter(report["machine"]["gpus"]), None) if report["settings"]["device"] == "cuda" else None
    peak = card_peak(gpu)
    base = phases.get("diffusers") or {}
    rows = {}
    for impl in ("diffusers", "sdfc"):
        r = phases.get(impl)
        if not r or "error" in r:
            continue
        call, rate = r.get("unet_call_s"), r.get("steps_per_s")
        row = {"s_per_image_vs_diffusers": _ratio(r.get("s_per_image"), base.get("s_per_image")),
               "unet_tflops_achieved": _significant(flops / call / 1e12) if flops and call else None,
               "step_tflops_achieved": _significant(flops * rate / 1e12) if flops and rate else None}
        if peak["tflops"]:
            row["unet_fraction_of_peak"] = _ratio(row["unet_tflops_achieved"], peak["tflops"], 4)
            row["step_fraction_of_peak"] = _ratio(row["step_tflops_achieved"], peak["tflops"], 4)
        rows[impl] = row
    floor = round(flops / (peak["tflops"] * 1e12), 5) if flops and peak["tflops"] else None
    return {"card_peak_fp16": peak, "unet_flops_per_step": flops, "compute_floor_s_per_step": floor,
            "by_impl": rows}


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _ratio(value, base, digits: int = 3):
    return None if value is None or not base else round(value / base, digits)


def _fmt(value, pattern: str = "{}") -> str:
    return "–" if value is None else pattern.format(value)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(report: dict) -> str:
    s, d, phases = report["settings"], report["derived"], report["phases"]
    m = report["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items()
                         if k in ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "optimum"))
    peak = d["card_peak_fp16"]
    title = f"## sdfc GPU proof, {report['started']}" + (" (dry run: tiny model on the CPU)" if s["dry_run"] else "")
    export_note = f" ({report['export_note']})" if report.get("export_note") else ""
    cards = "; ".join(f"{g.get('name')} (driver {g.get('driver_version')}, {g.get('memory.total')}, compute "
                      f"capability {g.get('compute_cap')})" for g in m.get("gpu_details") or []) or "no GPU"
    lines = [title, "",
             f"- Machine: {cards}; {m['cpu']}, {m['usable_cpus']} CPUs, "
             f"{m['memory_gib']} GiB; Python {m['python']}; {packages}",
             f"- Model: {s['size']} (UNet {_fmt((phases.get('build') or {}).get('unet_parameters'), '{:,}')} "
             f"parameters), random weights from seed {BUILD_SEED}, {s['dtype']}; export: "
             f"{report.get('served_export', '–')}{export_note}",
             f"- Settings: {s['side']}x{s['side']}, {s['steps']} steps, Euler, CFG 7, batch 1, device {s['device']}; "
             f"s/image = median of {s['runs']} after a warm-up image; one UNet call = a CFG step's batch of 2, "
             f"median of {s['unet_calls']}",
             f"- Compute floor: {_fmt(d['unet_flops_per_step'] and d['unet_flops_per_step'] / 1e12, '{:.4g}')} TFLOP "
             f"per step ÷ {_fmt(peak['tflops'])} TFLOP/s dense fp16 ({peak['source']}) = "
             f"{_fmt(d['compute_floor_s_per_step'] and d['compute_floor_s_per_step'] * 1e3, '{:.3g}')} ms per step "
             "(the UNet's multiply-adds alone at the card's peak: no implementation runs a step faster)",
             f"- Whole run: {report['total_s']:.0f} s", "",
             _row(["impl", "s/image", "× diffusers", "it/s (sampling)", "UNet call (ms)", "UNet TFLOP/s",
                   "% of peak (UNet alone)", "% of peak (sampling)", "load (s)", "warm-up (s)", "ready (s)",
                   "peak GPU MiB (device)", "peak MiB (torch alloc)"]),
             _row(["---"] * 13)]
    for impl in ("diffusers", "sdfc"):
        r = phases.get(impl)
        if r is None:
            lines.append(_row([impl, f"skipped: {report['skipped'].get(impl, '?')}", *[""] * 11]))
            continue
        if "error" in r:
            lines.append(_row([impl, f"error: {r['error']}", *[""] * 11]))
            continue
        lines.append(_row([impl, *_impl_cells(r, d["by_impl"].get(impl, {}))]))
    lines += [""]
    sdfc = phases.get("sdfc") or {}
    if sdfc.get("providers"):
        lines += ["- sdfc providers: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sdfc["providers"].items())]
    export = phases.get("export") or {}
    if export.get("manifest"):
        fused = (export["manifest"].get("fused_ops") or {}).get("unet")
        fused_text = f"; UNet fused ops: {', '.join(f'{k} {v}' for k, v in fused.items())}" if fused else ""
        lines += [f"- Export ({'--target cuda' if export['manifest'].get('target') == 'cuda' else 'plain fp16'}): "
                  f"{export['wall_s']:.0f} s, {sum(export.get('component_mib', {}).values())} MiB on disk"
                  f"{fused_text}"]
    cpus = (phases.get("diffusers") or {}).get("cpus")
    if cpus:
        beside = " while the export ran beside it on the other CPUs" if report.get("export_beside_diffusers") else ""
        lines += [f"- CPUs: diffusers and sdfc each ran on CPUs {cpus}{beside}"]
    if (phases.get("diffusers") or {}).get("attention_processor"):
        lines += [f"- diffusers attention: {phases['diffusers']['attention_processor']}"]
    lines += nv_lines(phases.get("nv"))
    lines += ["", _row(["phase", "wall (s)", "outcome"]), _row(["---"] * 3)]
    for name, r in phases.items():
        lines.append(_row([name, _fmt(r.get("wall_s"), "{:.1f}"), f"error: {r['error']}" if "error" in r else "ok"]))
    for name, reason in report["skipped"].items():
        lines.append(_row([name, "–", f"skipped: {reason}"]))
    return "\n".join(lines + [""])


def _impl_cells(r: dict, x: dict) -> list[str]:
    def scaled(value, factor):
        return None if value is None else value * factor
    return [_fmt(r.get("s_per_image"), "{:.3f}"), _fmt(x.get("s_per_image_vs_diffusers"), "{:.2f}×"),
            _fmt(r.get("steps_per_s"), "{:.2f}"), _fmt(scaled(r.get("unet_call_s"), 1e3), "{:.1f}"),
            _fmt(x.get("unet_tflops_achieved"), "{:.3g}"),
            _fmt(scaled(x.get("unet_fraction_of_peak"), 100), "{:.1f} %"),
            _fmt(scaled(x.get("step_fraction_of_peak"), 100), "{:.1f} %"),
            _fmt(r.get("load_s"), "{:.1f}"), _fmt(r.get("warmup_s"), "{:.2f}"), _fmt(r.get("ready_s"), "{:.1f}"),
            _fmt(r.get("device_peak_added_mib"), "{:.0f}"), _fmt(r.get("torch_max_memory_allocated_mib"), "{:.0f}")]


def nv_lines(nv: dict | None) -> list[str]:
    if not nv or "error" in nv:
        return [f"- NV noise: {'error: ' + nv['error'] if nv else 'not run'}"]
    out = []
    cpu = nv["cpu_control"]
    out.append(f"- Noise control, sdfc CPU source vs torch.randn (CPU generator): {cpu['identical_cases']}/"
               f"{cpu['total_cases']} cases bit-identical")
    cuda = nv["nv_vs_cuda"]
    if "skipped" in cuda:
        out.append(f"- NV noise vs torch.randn on CUDA: skipped ({cuda['skipped']})")
    else:
        out.append(f"- NV noise vs torch.randn on CUDA ({cuda['gpu']}, torch {cuda['torch']}): "
                   f"{cuda['identical_cases']}/{cuda['total_cases']} cases bit-identical, largest difference "
                   f"{cuda['max_abs_diff']:.3g} ({cuda['max_ulp_diff']} ULP), seeds {nv['seeds']}, "
                   f"shapes {nv['shapes']}")
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu",
                        help="folder for results.json, results.md, log.txt and the first images")
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny model on the CPU, 64x64, 2 steps: every phase a CPU can run (CI)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the models are built and exported (default: a temp folder, removed after)")
    parser.add_argument("--runs", type=int, default=None, help="images timed after the warm-up (default 3; dry 1)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; phases that no longer fit are skipped (default 470)")
    parser.add_argument("--no-export", dest="export", action="store_false",
                        help="build, the NV check and diffusers only (a short first call on a new machine)")
    parser.add_argument("--serial", dest="concurrent", action="store_false",
                        help="never run the export beside the diffusers phase (slower; nothing shares the CPUs)")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings.for_run(args.dry_run, args.runs, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="sdfc-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, work, settings)
    try:
        run_all(run, export=args.export, concurrent=args.concurrent)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        run.report["derived"] = derive(run.report)
        run.save()
        text = markdown(run.report)
        (args.out / "results.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    failed = [name for name, r in run.report["phases"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
