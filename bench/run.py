"""`sdfc bench`: sdfc against diffusers (PyTorch) and optimum's ORT pipeline, in one run.

For each model and implementation a fresh worker process (bench/worker.py) imports, loads and makes
images; this parent times it from the outside, collects its JSON line, and prints a Markdown table of
ratios to diffusers with the issue's targets. The parent imports neither torch nor onnxruntime: model
building runs in its own subprocess, so nothing of the parent's size is charged to a worker.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import machine, report
from .models import DEFAULT_CACHE, IMAGE_SIDE, REPO, BenchModel
from .worker import FIRST_IMAGE, RESULT

log = logging.getLogger("bench")

IMPLS = ("diffusers", "optimum", "sdfc")  # diffusers first: it is the baseline of every ratio
# No hub lookups or telemetry in any worker: a network timeout must never be timed as a cold start.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1",
              "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class WorkerRun:
    impl: str
    model: BenchModel
    runs: int
    device: str
    out: Path
    timeout_s: float
    nice: int = 0

    @property
    def model_dir(self) -> Path:
        return self.model.diffusers_dir if self.impl == "diffusers" else self.model.onnx_dir

    @property
    def name(self) -> str:
        return f"{self.model.size}-{self.impl}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.worker", "--impl", self.impl, "--model", str(self.model_dir),
                "--side", str(self.model.side), "--runs", str(self.runs), "--device", self.device,
                "--image", str(self.out / "images" / f"{self.name}.png")]


def run_worker(spec: WorkerRun) -> dict:
    """Spawn one worker and measure it from outside: wall time to its first image, CPU, others' load."""
    log_path = spec.out / "logs" / f"{spec.name}.log"
    busy_before, own_before = machine.busy_cpu_seconds(), machine.own_cpu_seconds()
    with log_path.open("w") as stderr:
        start = time.monotonic()
        env = {**os.environ, **WORKER_ENV, "BENCH_SPAWN_MONOTONIC": repr(start)}
        proc = subprocess.Popen(spec.command(), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                text=True, start_new_session=bool(spec.nice), preexec_fn=_niceness(spec.nice))
        timer = threading.Timer(spec.timeout_s, proc.kill)
        timer.start()
        first_image_at, result = None, None
        for line in proc.stdout:
            if line.startswith(FIRST_IMAGE) and first_image_at is None:
                first_image_at = time.monotonic()
            elif line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
        # wait4 rather than proc.wait(): it also returns the child's own CPU time.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        timer.cancel()
    child_cpu = usage.ru_utime + usage.ru_stime
    others = machine.busy_cpu_seconds() - busy_before - child_cpu - (machine.own_cpu_seconds() - own_before)
    if proc.returncode != 0 or result is None or first_image_at is None:
        return {"impl": spec.impl, "error": f"worker exited with {proc.returncode}; see {log_path}",
                "log_tail": _tail(log_path)}
    return {**result, "cold_start_s": round(first_image_at - start, 3), "process_wall_s": round(wall, 2),
            "cpu_s": round(child_cpu, 2), "other_cpu_load": round(max(others, 0.0) / wall, 2),
            "ru_maxrss_mib": round(usage.ru_maxrss / 1024, 1), "nice": spec.nice, "log": str(log_path)}


def _niceness(increment: int):
    """Run the worker at another priority: negative (root only) on a shared machine, so that other
    people's jobs do not inflate its timings.

    With autogroup scheduling (Linux's default) nice only ranks processes within one session, so the
    worker gets a session of its own (start_new_session) and that session's autogroup gets the niceness.
    """
    if not increment:
        return None

    def apply() -> None:
        try:
            Path("/proc/self/autogroup").write_text(str(increment))
        except OSError:
            pass  # no autogroup scheduling here: plain nice is enough
        os.nice(increment)
    return apply


def _tail(path: Path, lines: int = 5) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:]


def ensure_models(sizes: list[str], cache: Path) -> dict[str, BenchModel]:
    """Build missing models in a child process (it needs torch; this parent stays lean)."""
    code = ("import json, logging, sys; logging.basicConfig(level=logging.INFO); "
            "from bench.models import ensure_model; "
            "print(json.dumps({s: ensure_model(s, sys.argv[2]).describe() for s in sys.argv[1].split(',')}))")
    out = subprocess.run([sys.executable, "-c", code, ",".join(sizes), str(cache)], cwd=REPO, check=True,
                         stdout=subprocess.PIPE, text=True)
    described = json.loads(out.stdout.strip().splitlines()[-1])
    return {s: BenchModel(s, Path(d["diffusers_dir"]), Path(d["onnx_dir"]), IMAGE_SIDE[s]) for s, d in
            described.items()}


def warm_page_cache(models: dict[str, BenchModel], impls: list[str]) -> None:
    """Read libraries and model files once, so that no worker pays the first disk read for all of them.

    Cold start then means a new process on a machine whose disk cache is warm: what a restarted
    serverless instance on the same host sees, and the same footing for every implementation.
    """
    modules = {"sdfc": ["sdfc.engine", "onnxruntime", "tokenizers"], "diffusers": ["torch", "diffusers"],
               "optimum": ["torch", "diffusers", "transformers", "optimum.onnxruntime"]}
    wanted = sorted({m for impl in impls for m in modules[impl]})
    subprocess.run([sys.executable, "-c", "import " + ", ".join(wanted)], cwd=REPO, check=True,
                   env={**os.environ, **WORKER_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for model in models.values():
        for path in [*model.onnx_dir.rglob("*"), *model.diffusers_dir.rglob("*")]:
            if path.is_file():
                with path.open("rb") as f:
                    while f.read(1 << 24):
                        pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdfc bench", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,mid", help="comma-separated sizes: tiny, mid")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: diffusers, optimum, sdfc")
    parser.add_argument("--runs", type=int, default=5, help="warm images per process (median reported)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda runs the one-call GPU proof instead (bench/gpu.py: --out, --dry-run)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "results",
                        help="folder for results.json, results.md, logs and first images")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the built models are kept")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a worker is killed")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness increment for the workers; negative (root) on a shared machine")
    args = parser.parse_args(argv)
    args.models = _choices(parser, "--models", args.models, IMAGE_SIDE)
    args.impls = _choices(parser, "--impls", args.impls, IMPLS)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _choices(parser, option: str, value: str, valid) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in valid]
    if unknown or not items:
        parser.error(f"{option}: unknown {', '.join(unknown) or 'empty list'}; valid: {', '.join(valid)}")
    # Whatever order was asked for, diffusers runs first and sdfc last (the report's row order).
    return sorted(items, key=list(valid).index)


def _gpu_proof_argv(argv: list[str]) -> list[str] | None:
    """The arguments for bench/gpu.py when `--device cuda` was asked for (without that option), else None."""
    for i, arg in enumerate(argv):
        if arg == "--device=cuda":
            return argv[:i] + argv[i + 1:]
        if arg == "--device" and argv[i + 1:i + 2] == ["cuda"]:
            return argv[:i] + argv[i + 2:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:  # `sdfc bench load`: the loopback load test, see bench/load.py
        from .load import main as load_main
        return load_main(argv[1:])
    gpu_argv = _gpu_proof_argv(argv)
    if gpu_argv is not None:  # `sdfc bench --device cuda`: the one-call GPU proof, see bench/gpu.py
        from .gpu import main as gpu_main
        return gpu_main(gpu_argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    for sub in ("logs", "images"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    models = ensure_models(args.models, args.cache)
    warm_page_cache(models, args.impls)
    results: dict[str, dict[str, dict]] = {}
    for size, model in models.items():
        results[size] = {}
        for impl in args.impls:
            log.info("measuring %s on %s (%d warm images)", impl, size, args.runs)
            results[size][impl] = run_worker(WorkerRun(impl, model, args.runs, args.device, args.out,
                                                       args.timeout, args.nice))
    rel = {size: report.ratios(by_impl) for size, by_impl in results.items()}
    full = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "settings": {"device": args.device, "runs": args.runs, "steps": 20, "cfg_scale": 7.0, "sampler": "Euler",
                     "impls": args.impls, "nice": args.nice},
        "models": {size: model.describe() for size, model in models.items()},
        "results": results,
        "ratios": rel,
        "targets": {size: report.verdicts(size, rel[size].get("sdfc", {}), report.floors(by_impl))
                    for size, by_impl in results.items()},
        "total_s": round(time.monotonic() - t0, 1),
    }
    text = report.markdown(full)
    (args.out / "results.json").write_text(json.dumps(full, indent=2) + "\n")
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    failed = [f"{size}/{impl}" for size, by_impl in results.items() for impl, r in by_impl.items() if "error" in r]
    if failed:
        log.error("failed workers: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
