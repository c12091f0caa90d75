"""One measured process: import one implementation, load one model, make images, print the numbers.

    python -m bench.worker --impl sdfc|diffusers|optimum --model DIR --side 64 --runs 5 --image first.png

The parent times this process from the outside: it starts the clock before spawning us and stops it when
it reads the FIRST_IMAGE line, printed once the first image is on disk. The last stdout line is RESULT
followed by a JSON object with the inside view (phases, warm latencies, peak RSS, providers, threads).

This module imports only the standard library at the top: whatever an implementation needs is imported
inside its own functions, so that the import cost is measured and the sdfc worker never loads torch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

FIRST_IMAGE = "BENCH_FIRST_IMAGE"
RESULT = "BENCH_RESULT "
PROMPT = "a photo of an astronaut riding a horse on the moon"
SEED = 1


@dataclass(frozen=True)
class Job:
    model_dir: Path
    side: int
    steps: int
    cfg_scale: float
    device: str


@dataclass(frozen=True)
class Impl:
    """How one implementation imports, loads a model, makes one image, and describes its setup."""

    do_imports: Callable[[], None]
    load: Callable[[Job], Any]
    generate: Callable[[Any, Job], Any]  # -> PIL image
    describe: Callable[[Any], dict]


# --- sdfc: our engine (onnxruntime + numpy + tokenizers) -------------------------------------------

def _sdfc_imports() -> None:
    import sdfc.engine  # noqa: F401


def _sdfc_load(job: Job):
    from sdfc.engine import Engine
    engine = Engine(job.model_dir, device=job.device)
    engine.load()  # sessions are created lazily; a server pays this before its first request
    return engine


def _sdfc_generate(engine, job: Job):
    from sdfc.engine import GenerationRequest
    req = GenerationRequest(prompt=PROMPT, width=job.side, height=job.side, steps=job.steps,
                            cfg_scale=job.cfg_scale, sampler_name="Euler", seed=SEED)
    return engine.generate(req).images[0]


def _sdfc_describe(engine) -> dict:
    sessions = engine.load().sessions
    return {"providers": sessions["unet"].get_providers(), "ort_session": _ort_options(sessions["unet"])}


# --- diffusers: the PyTorch StableDiffusionPipeline, fp32 ------------------------------------------

def _diffusers_imports() -> None:
    import torch  # noqa: F401
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: F401


def _diffusers_load(job: Job):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    scheduler = EulerDiscreteScheduler.from_pretrained(job.model_dir, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(job.model_dir, scheduler=scheduler, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(job.device)


def _torch_generate(pipe, job: Job):
    import torch
    generator = torch.Generator("cpu").manual_seed(SEED)
    return pipe(PROMPT, width=job.side, height=job.side, num_inference_steps=job.steps,
                guidance_scale=job.cfg_scale, generator=generator).images[0]


def _diffusers_describe(pipe) -> dict:
    return {"providers": None, "torch": _torch_threads()}


# --- optimum: ORTStableDiffusionPipeline on the same ONNX export -----------------------------------

def _optimum_imports() -> None:
    from diffusers import EulerDiscreteScheduler  # noqa: F401
    from optimum.onnxruntime import ORTStableDiffusionPipeline  # noqa: F401


def _optimum_load(job: Job):
    from diffusers import EulerDiscreteScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    scheduler = EulerDiscreteScheduler.from_pretrained(job.model_dir, subfolder="scheduler")
    provider = "CUDAExecutionProvider" if job.device == "cuda" else "CPUExecutionProvider"
    pipe = ORTStableDiffusionPipeline.from_pretrained(job.model_dir, scheduler=scheduler, provider=provider)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _optimum_describe(pipe) -> dict:
    session = pipe.unet.session
    return {"providers": session.get_providers(), "ort_session": _ort_options(session),
            "torch": _torch_threads()}


IMPLS = {
    "sdfc": Impl(_sdfc_imports, _sdfc_load, _sdfc_generate, _sdfc_describe),
    "diffusers": Impl(_diffusers_imports, _diffusers_load, _torch_generate, _diffusers_describe),
    "optimum": Impl(_optimum_imports, _optimum_load, _torch_generate, _optimum_describe),
}


# --- what the process looks like ------------------------------------------------------------------

def _ort_options(session) -> dict:
    """The session options in force; 0 threads means onnxruntime's default (one per physical core)."""
    options = session.get_session_options()
    return {"intra_op_num_threads": options.intra_op_num_threads,
            "inter_op_num_threads": options.inter_op_num_threads,
            "execution_mode": str(options.execution_mode),
            "graph_optimization_level": str(options.graph_optimization_level),
            "enable_cpu_mem_arena": options.enable_cpu_mem_arena,
            "enable_mem_pattern": options.enable_mem_pattern}


def _torch_threads() -> dict:
    import torch
    return {"num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process image (VmHWM).

    Not ru_maxrss: Linux folds the pre-exec memory of the forked (or vforked) parent into ru_maxrss,
    which would charge the parent's size to the worker.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best we have


def os_thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def gpu_name(device: str) -> str | None:
    if device != "cuda":
        return None
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    try:  # the sdfc worker has no torch to ask
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def since(start: float) -> float:
    return round(time.monotonic() - start, 4)


# --- the measurement --------------------------------------------------------------------------------

def measure(impl_name: str, job: Job, runs: int, first_image: Path, process_start: float) -> dict:
    """Imports, load, first image (written to disk), then `runs` timed warm images."""
    impl = IMPLS[impl_name]
    phases = {}
    t = time.monotonic()
    impl.do_imports()
    phases["imports_s"] = since(t)
    t = time.monotonic()
    pipe = impl.load(job)
    phases["load_s"] = since(t)
    # Ready to serve: what a server's cold start costs before any request's own work.
    phases["start_to_ready_s"] = since(process_start)
    rss_at_ready = peak_rss_mib()  # imports + loaded weights, before any activation
    t = time.monotonic()
    image = impl.generate(pipe, job)
    image.save(first_image)
    phases["first_image_s"] = since(t)
    phases["start_to_first_image_s"] = since(process_start)
    # Outside clock stops here: the parent reads this line.
    print(FIRST_IMAGE, flush=True)
    rss_after_first = peak_rss_mib()
    warm = []
    for _ in range(runs):
        t = time.monotonic()
        impl.generate(pipe, job)
        warm.append(since(t))
    return {
        "impl": impl_name, "device": job.device, "side": job.side, "steps": job.steps,
        "cfg_scale": job.cfg_scale, "sampler": "Euler", "runs": runs,
        **phases,
        "warm_s": warm, "warm_median_s": statistics.median(warm) if warm else None,
        "peak_rss_mib": round(peak_rss_mib(), 1), "peak_rss_at_ready_mib": round(rss_at_ready, 1),
        "peak_rss_after_first_image_mib": round(rss_after_first, 1),
        "image_size": list(image.size), "os_threads": os_thread_count(),
        "torch_imported": "torch" in sys.modules, "gpu": gpu_name(job.device),
        **impl.describe(pipe),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=sorted(IMPLS), required=True)
    parser.add_argument("--model", type=Path, required=True, help="model folder (diffusers or ONNX form)")
    parser.add_argument("--side", type=int, required=True, help="image width and height in pixels")
    parser.add_argument("--runs", type=int, default=5, help="warm images after the first (median taken)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--image", type=Path, required=True, help="where to write the first image")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # The parent's spawn time if it gave one (same monotonic clock system-wide), else our own start.
    process_start = float(os.environ.get("BENCH_SPAWN_MONOTONIC", time.monotonic()))
    args = parse_args(sys.argv[1:] if argv is None else argv)
    job = Job(args.model, args.side, args.steps, args.cfg_scale, args.device)
    result = measure(args.impl, job, args.runs, args.image, process_start)
    print(RESULT + json.dumps(result), flush=True)
    if args.impl == "sdfc" and result["torch_imported"]:
        # The serving runtime must stay torch-free (DESIGN.md): a bench that loaded torch is void.
        print("error: the sdfc worker imported torch", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
