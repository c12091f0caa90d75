"""One phase of the GPU proof in its own process: nv | build | diffusers | sdfc.

    python -m bench.gpu_worker PHASE --json '{...}'

Each phase runs alone so that its GPU memory is its own (nvidia-smi reads the whole card) and is freed when it
exits; the last stdout line is RESULT followed by a JSON object. Only the standard library is imported at the
top: torch stays out of the sdfc phase (the serving engine is torch-free), onnxruntime out of the torch ones.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULT = "GPU_BENCH_RESULT "
PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = ""
SEED = 1
CFG_SCALE = 7.0


# --- GPU memory as the card reports it (whole device: other processes included) ------------------------

def _nvml_reader():
    try:
        import pynvml  # nvidia-ml-py: on the GPU image, not required elsewhere
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2 ** 20
    except Exception:  # noqa: BLE001 - no library, no driver, no device: try nvidia-smi
        return None


def _smi_reader():
    def read() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=10)
            return float(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            return None
    return read if read() is not None else None


class DeviceMemoryPoller:
    """Polls the card's used memory in a thread; `peak_mib - baseline_mib` is what this process added
    (the phases run one at a time, so nothing else of ours holds the card meanwhile)."""

    def __init__(self):
        nvml = _nvml_reader()
        self.read, self.source = (nvml, "nvml") if nvml else (_smi_reader(), "nvidia-smi")
        self.interval_s = 0.05 if self.source == "nvml" else 0.25  # one nvidia-smi call takes tens of ms
        self.baseline_mib = self.read() if self.read else None
        self.peak_mib = self.baseline_mib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if self.read else None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.read()
            if value is not None and (self.peak_mib is None or value > self.peak_mib):
                self.peak_mib = value
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def describe(self) -> dict:
        if self.read is None:
            return {"device_memory_source": None, "device_peak_mib": None,
                    "device_memory_note": "neither NVML nor nvidia-smi answered"}
        return {"device_memory_source": self.source, "device_baseline_mib": self.baseline_mib,
                "device_peak_mib": self.peak_mib, "device_peak_added_mib": self.peak_mib - self.baseline_mib}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _step_rate(stamps: list[float]) -> float | None:
    """Sampling steps per second from the callbacks' clock, between the first step's end and the last's: the
    first step (text encoding, the loop's set-up) is left out."""
    if len(stamps) < 2:
        return None
    return round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 3)


# --- nv: sdfc's NV noise (numpy Philox) against torch.randn on a CUDA generator -----------------------------

NV_SEEDS = (0, 1, 1234, 4294967294, 2 ** 40 + 7)
NV_SHAPES = ((3, 4), (1, 4, 64, 64), (2, 4, 96, 64))


def compare_bits(ours, theirs) -> dict:
    """Bit-for-bit comparison of two float32 arrays: equal elements, largest difference in value and in ULPs."""
    import numpy as np

    a, b = np.ascontiguousarray(ours, np.float32), np.ascontiguousarray(theirs, np.float32)
    if a.shape != b.shape:
        return {"shape": list(a.shape), "other_shape": list(b.shape), "bit_identical": False}
    ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
    # Ordered integer view: adjacent floats differ by 1 across zero too.
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    equal = int((a.view(np.uint32) == b.view(np.uint32)).sum())
    return {"shape": list(a.shape), "elements": int(a.size), "equal_elements": equal,
            "bit_identical": equal == a.size, "max_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0,
            "max_ulp_diff": int(np.abs(ia - ib).max()) if a.size else 0}


def phase_nv(args: dict) -> dict:
    import torch

    from sdfc.engine.rng import PhiloxGenerator, TorchCPUGenerator

    result: dict = {"seeds": list(NV_SEEDS), "shapes": [list(s) for s in NV_SHAPES]}
    cases = []
    # Always: the CPU source against torch's CPU generator, which sdfc reproduces bit for bit. It proves the
    # comparison itself on any machine (a comparator that cannot say "identical" proves nothing on the GPU).
    for seed in NV_SEEDS:
        for shape in NV_SHAPES:
            ours = TorchCPUGenerator(seed).randn(shape)
            theirs = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
            cases.append({"source": "CPU", "against": "torch.randn (CPU generator)", "seed": seed,
                          **compare_bits(ours, theirs)})
    result["cpu_control"] = _summary(cases)
    if not torch.cuda.is_available():
        result["nv_vs_cuda"] = {"skipped": "no CUDA device visible to torch"}
        return result
    cuda_cases = []
    for seed in NV_SEEDS:
        for shape in NV_SHAPES:
            ours = PhiloxGenerator(seed).randn(shape)  # a fresh generator's first draw (offset 0)
            generator = torch.Generator("cuda").manual_seed(seed)
            theirs = torch.randn(shape, generator=generator, device="cuda").cpu().numpy()
            cuda_cases.append({"source": "NV", "against": "torch.randn (CUDA generator)", "seed": seed,
                               **compare_bits(ours, theirs)})
    result["nv_vs_cuda"] = {**_summary(cuda_cases), "gpu": torch.cuda.get_device_name(0),
                            "torch": torch.__version__, "cuda": torch.version.cuda}
    return result


def _summary(cases: list[dict]) -> dict:
    return {"cases": cases, "all_bit_identical": all(c["bit_identical"] for c in cases),
            "identical_cases": sum(c["bit_identical"] for c in cases), "total_cases": len(cases),
            "max_abs_diff": max(c.get("max_abs_diff", float("inf")) for c in cases),
            "max_ulp_diff": max(c.get("max_ulp_diff", -1) for c in cases)}


# --- build: the random-weight diffusers model, on the device, in fp16 -------------------------------------

def phase_build(args: dict) -> dict:
    from bench.gpu_model import build, unet_flops
    t = time.monotonic()
    built = build(Path(args["out"]), args["size"], args["seed"], args["device"], args["dtype"],
                  Path(args["tokenizer_from"]))
    built["build_s"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    flops = unet_flops(args["size"], batch=2 * args["batch"], latent_side=args["side"] // 8)
    built["unet_flops"] = {**flops, "counted_s": round(time.monotonic() - t, 2),
                           "note": "one UNet call of a CFG step (cond + uncond rows)"}
    return built


# --- diffusers: StableDiffusionPipeline in PyTorch (SDPA attention), fp16 ---------------------------------

def phase_diffusers(args: dict) -> dict:
    t0 = time.monotonic()
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    imports_s = time.monotonic() - t0
    device, dtype = args["device"], {"fp16": torch.float16, "fp32": torch.float32}[args["dtype"]]
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with DeviceMemoryPoller() as poller:
        t = time.monotonic()
        scheduler = EulerDiscreteScheduler.from_pretrained(args["model"], subfolder="scheduler")
        pipe = StableDiffusionPipeline.from_pretrained(args["model"], scheduler=scheduler, torch_dtype=dtype,
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        sync()
        load_s = time.monotonic() - t
        processor = type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__

        def generate(stamps: list[float] | None = None):
            def on_step(_pipe, _i, _t, kwargs):
                if stamps is not None:
                    sync()
                    stamps.append(time.monotonic())
                return kwargs
            generator = torch.Generator(device).manual_seed(SEED)
            images = pipe(PROMPT, negative_prompt=NEGATIVE, width=args["side"], height=args["side"],
                          num_inference_steps=args["steps"], guidance_scale=CFG_SCALE, generator=generator,
                          output_type="np", callback_on_step_end=on_step).images
            sync()
            return images

        t = time.monotonic()
        first = generate()
        warmup_s = time.monotonic() - t
        warm, stamps = [], []
        for _ in range(args["runs"]):
            t = time.monotonic()
            generate()
            warm.append(time.monotonic() - t)
        generate(stamps)  # one more, untimed as a whole: its steps' clock (a sync per step) gives it/s
        unet = _guarded(_torch_unet_call, pipe, args, torch, sync)
    _save_png(first[0], args["image"])
    return {
        "impl": "diffusers", "device": device, "dtype": args["dtype"], "attention_processor": processor,
        "imports_s": round(imports_s, 2), "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 3),
        "ready_s": round(load_s + warmup_s, 2),
        "warm_s": [round(w, 4) for w in warm], "s_per_image": _median(warm), "steps_per_s": _step_rate(stamps),
        **unet, "torch_max_memory_allocated_mib":
            round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else None,
        "torch_max_memory_reserved_mib": round(torch.cuda.max_memory_reserved() / 2 ** 20, 1) if cuda else None,
        **poller.describe(), "image_finite": bool(_finite(first)),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def _torch_unet_call(pipe, args: dict, torch, sync) -> dict:
    """One CFG step's UNet call alone (batch 2), median of a few; FLOPs as torch's own counter saw them."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    batch, side = 2, args["side"] // 8
    sample = torch.randn(batch, unet.config.in_channels, side, side, device=unet.device, dtype=unet.dtype)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    timestep = torch.tensor(500.0, device=unet.device)
    times = []
    with torch.inference_mode():
        for _ in range(args["unet_calls"] + 2):
            sync()
            t = time.monotonic()
            unet(sample, timestep, context)
            sync()
            times.append(time.monotonic() - t)
        with FlopCounterMode(display=False) as counter:
            unet(sample, timestep, context)
    return {"unet_call_s": _median(times[2:]), "torch_flop_counter": counter.get_total_flops()}


# --- sdfc: the engine (onnxruntime) on the export ---------------------------------------------------------

def phase_sdfc(args: dict) -> dict:
    t0 = time.monotonic()
    import numpy as np
    import onnxruntime as ort

    from sdfc.engine import Engine, GenerationRequest, JobControl, NaNError
    imports_s = time.monotonic() - t0
    device = args["device"]
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        return {"impl": "sdfc", "skipped": f"onnxruntime {ort.__version__} offers no CUDAExecutionProvider "
                f"(providers: {', '.join(available)}); install onnxruntime-gpu (see the README section)",
                "onnxruntime": ort.__version__, "available_providers": available}
    preload = None
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia-* wheels torch brought, where LD_LIBRARY_PATH lacks them
            ort.preload_dlls()
            preload = "ok"
        except Exception as exc:  # noqa: BLE001 - reported; the session's own loading may still succeed
            preload = f"failed: {exc}"

    class TimedControl(JobControl):
        """Records when each sampling step ends (the engine reports every step here)."""
        stamps: list

        def _step(self, step, latent):
            super()._step(step, latent)
            self.stamps.append(time.monotonic())

    def request() -> GenerationRequest:
        return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=args["side"], height=args["side"],
                                 steps=args["steps"], cfg_scale=CFG_SCALE, sampler_name="Euler", seed=SEED)

    with DeviceMemoryPoller() as poller:
        t = time.monotonic()
        engine = Engine(args["model"], device=device)
        model = engine.load()  # every session created here, as a server does before its first request
        load_s = time.monotonic() - t
        t = time.monotonic()
        try:
            first = engine.generate(request())
        except NaNError as exc:  # random fp16 weights that overflow: say so, with what was measured until then
            return {"impl": "sdfc", "error": f"NaNError: {exc}", "load_s": round(load_s, 2),
                    "providers": {name: s.get_providers() for name, s in model.sessions.items()
                                  if hasattr(s, "get_providers")}}
        warmup_s = time.monotonic() - t
        warm = []
        for _ in range(args["runs"]):
            t = time.monotonic()
            engine.generate(request())
            warm.append(time.monotonic() - t)
        control = TimedControl()
        control.stamps = []
        engine.generate(request(), control)  # one more, untimed as a whole: its steps' clock gives it/s
        unet = _guarded(_ort_unet_call, model.sessions["unet"], args, np)
    first.images[0].save(args["image"])
    sessions = model.sessions
    return {
        "impl": "sdfc", "device": device, "imports_s": round(imports_s, 2), "load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 3), "ready_s": round(load_s + warmup_s, 2),
        "warm_s": [round(w, 4) for w in warm], "s_per_image": _median(warm),
        "steps_per_s": _step_rate(control.stamps), **unet, **poller.describe(),
        # Best effort (an engine attribute): whether an fp16 VAE overflow made the engine decode again in fp32.
        "fp32_vae_decoder_used": getattr(getattr(model, "fp32_vae", None), "_warned", None),
        "providers": {name: s.get_providers() for name, s in sessions.items() if hasattr(s, "get_providers")},
        "image_finite": bool(np.isfinite(first.float_images[0]).all()), "onnxruntime": ort.__version__,
        "available_providers": available, "preload_dlls": preload, "torch_imported": "torch" in sys.modules,
    }


def _ort_unet_call(session, args: dict, np) -> dict:
    """One CFG step's UNet call alone (batch 2) through the engine's own session, median of a few."""
    dtypes = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64}
    rng = np.random.default_rng(0)
    side, feeds = args["side"] // 8, {}
    for spec in session.get_inputs():
        dtype = dtypes.get(spec.type, np.float32)
        if spec.name == "sample":
            feeds[spec.name] = rng.standard_normal((2, spec.shape[1], side, side)).astype(dtype)
        elif spec.name == "timestep":  # one per row where the graph takes a vector, as the engine feeds it
            feeds[spec.name] = np.array([500.0] * 2 if len(spec.shape) == 1 else 500.0, dtype=dtype)
        elif spec.name == "encoder_hidden_states":
            feeds[spec.name] = rng.standard_normal((2, 77, spec.shape[2])).astype(dtype)
        else:
            return {"unet_call_s": None, "unet_call_note": f"unexpected UNet input {spec.name!r}"}
    times = []
    for _ in range(args["unet_calls"] + 2):
        t = time.monotonic()
        session.run(None, feeds)
        times.append(time.monotonic() - t)
    return {"unet_call_s": _median(times[2:]), "unet_call_note": "session.run with host inputs and outputs"}


def _guarded(measure, *args) -> dict:
    """The UNet-alone figure is an extra: its failure is reported without losing the pipeline's figures."""
    try:
        return measure(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the result
        return {"unet_call_s": None, "unet_call_error": f"{type(exc).__name__}: {exc}"}


def _finite(images) -> bool:
    import numpy as np
    return bool(np.isfinite(np.asarray(images)).all())


def _save_png(array, path: str) -> None:
    import numpy as np
    from PIL import Image
    Image.fromarray((np.nan_to_num(np.asarray(array)).clip(0, 1) * 255).round().astype("uint8")).save(path)


PHASES = {"nv": phase_nv, "build": phase_build, "diffusers": phase_diffusers, "sdfc": phase_sdfc}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in PHASES or argv[1] != "--json":
        print(f"usage: python -m bench.gpu_worker {{{'|'.join(PHASES)}}} --json '{{...}}'", file=sys.stderr)
        return 2
    result = PHASES[argv[0]](json.loads(argv[2]))
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
