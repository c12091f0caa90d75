"""The generation pipeline: request → seeds and noise → sampler loop over a CFG denoiser → VAE → images.

`Engine` is held once per process (`setup` cost paid once); `generate` is one call per request and keeps
no state between requests apart from the loaded models. A `JobControl` passed in carries progress out
and interrupt/skip in, so that other threads (the HTTP progress route) can watch and steer a job.
"""
from __future__ import annotations

import inspect
import logging
import math
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import hires as hires_mod
from . import inpaint as inpaint_mod
from . import samplers as samplers_mod
from . import schedules
from . import embeddings as embeddings_mod
from . import lora as lora_mod
from . import sdxl as sdxl_mod
from . import precision as precision_mod
from .brownian import BrownianNoise
from .conditioning import PromptEncoder
from .denoiser import CFGDenoiser
from . import memory
from .model_cache import DEFAULT_OTHERS, ModelCache, resident_bytes
from .errors import Interrupted, InvalidRequestError, ModelNotFoundError, NaNError, OutOfMemoryError
from .models import ModelInfo, OnnxModel, load_tokenizer, scan_models
from .providers import CudaOptions
from .rng import ImageRNG

log = logging.getLogger("sdfc.engine")

MAX_SEED = 4294967294  # A1111 draws random seeds from range(4294967294)
NOISE_SOURCES = ("GPU", "CPU", "NV")


@dataclass
class GenerationRequest:
    """One txt2img or img2img job, in A1111's terms (defaults are the engine's, not the API's)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: str = "Euler"
    scheduler: str | None = None  # None or "Automatic": the sampler's default schedule
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None       # None: option eta_ancestral (k-diffusion) / eta_ddim (DDIM)
    eta_ancestral: float = 1.0
    eta_ddim: float = 0.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0            # 0 means infinity, as A1111's option
    s_noise: float = 1.0
    noise_source: str = "GPU"      # option randn_source
    emphasis: str = "Original"     # option emphasis
    clip_skip: int = 1             # option CLIP_stop_at_last_layers
    comma_padding_backtrack: int = 20
    eta_noise_seed_delta: int = 0
    model: str | None = None       # name, title or hash; None: the engine's current model
    init_images: list[Image.Image] | None = None  # img2img when given
    denoising_strength: float = 0.75
    resize_mode: int = 0             # 0-3 as A1111 (init_image.py)
    mask: Image.Image | None = None  # inpainting: white is repainted (inpaint.py)
    latent_mask: Image.Image | None = None  # A1111's p.latent_mask: the mask of the latent blend and the fill
    inpaint: inpaint_mod.InpaintOptions = field(default_factory=inpaint_mod.InpaintOptions)
    initial_noise_multiplier: float = 1.0  # img2img: the initial noise scaled by this
    tiling: bool = False           # seamless images: circular convolutions in the UNet and VAE (A1111)
    hires: hires_mod.HiresFix | None = None  # txt2img hires fix: a second pass at a larger size (hires.py)
    img2img_fix_steps: bool = False  # A1111's option: img2img runs exactly `steps` steps (hires always does)
    hires_base_steps: int | None = None  # set on a hires second pass: the first pass's prompt-schedule steps
    refiner_checkpoint: str | None = None  # A1111 1.6+: the model that finishes sampling (sdxl.py)
    refiner_switch_at: float | None = None  # the completed fraction at which it takes over (None: at once)
    sdxl: sdxl_mod.SizeConditioning = field(default_factory=sdxl_mod.SizeConditioning)  # sdxl_crop_*, scores
    auto_vae_precision: bool = True  # A1111's option: an fp16 VAE's NaNs are decoded again in fp32 (precision.py)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    float_images: list[np.ndarray]  # (H, W, 3) in [0, 1] before 8-bit conversion, for exact comparisons
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    sampler_name: str
    schedule_label: str | None      # None when the sampler's Automatic choice was used
    model: ModelInfo
    request: GenerationRequest
    interrupted: bool = False
    extra_generation_params: dict = field(default_factory=dict)  # infotext entries the job added (A1111's)


@dataclass
class JobControl:
    """Progress out, interrupt and skip in. Read by other threads while a job runs."""

    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    current_latent: np.ndarray | None = None
    preview_factors: tuple | None = None  # the job's model family's latent → RGB rows (architectures.py)
    interrupted: bool = False
    skipped: bool = False
    embeddings_used: list[str] = field(default_factory=list)  # textual-inversion names the prompts used
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    @property
    def progress(self) -> float:
        with self._lock:
            if not self.job_count or not self.sampling_steps:
                return 0.0
            return (self.job_no + self.sampling_step / self.sampling_steps) / self.job_count

    def _step(self, step: int, latent: np.ndarray) -> None:
        with self._lock:
            self.sampling_step = step
            self.current_latent = latent

    def _check(self) -> None:
        if self.interrupted or self.skipped:
            raise Interrupted("job interrupted" if self.interrupted else "image skipped")


def resolve_seed(seed: int | None) -> int:
    if seed is None or int(seed) == -1:
        return random.randrange(MAX_SEED)
    return int(seed)


def _positive_int(name: str, value, upper: int | None = None) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1 or (upper and value > upper):
        bound = f" and at most {upper}" if upper else ""
        raise InvalidRequestError(f"{name} must be an integer of at least 1{bound}, got {value!r}")


def validate(req: GenerationRequest) -> tuple[samplers_mod.Sampler, schedules.Schedule | None]:
    """Check a request; return its sampler and explicit schedule (None: the sampler's Automatic)."""
    for name in ("width", "height"):
        value = getattr(req, name)
        _positive_int(name, value)
        if value % 8:
            raise InvalidRequestError(f"{name} must be a multiple of 8, got {value}")
    _positive_int("steps", req.steps)
    _positive_int("batch_size", req.batch_size)
    _positive_int("n_iter", req.n_iter)
    if not isinstance(req.tiling, bool):
        raise InvalidRequestError(f"tiling must be true or false, got {req.tiling!r}")
    if not math.isfinite(req.cfg_scale):
        raise InvalidRequestError(f"cfg_scale must be a finite number, got {req.cfg_scale!r}")
    if req.init_images is not None and not 0 <= req.denoising_strength <= 1:
        raise InvalidRequestError(f"denoising_strength must be between 0 and 1, got {req.denoising_strength}")
    if req.init_images is not None:
        if req.resize_mode not in (0, 1, 2, 3) or isinstance(req.resize_mode, bool):
            raise InvalidRequestError(f"resize_mode must be 0, 1, 2 or 3, got {req.resize_mode!r}")
        mult = req.initial_noise_multiplier
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 <= mult < math.inf:
            raise InvalidRequestError(f"initial_noise_multiplier must be a finite number of at least 0, got {mult!r}")
        inpaint_mod.validate(req.inpaint)
    if req.noise_source not in NOISE_SOURCES:
        raise InvalidRequestError(f"unknown noise source {req.noise_source!r}; valid: {', '.join(NOISE_SOURCES)}")
    labels = [s.label for s in schedules.SCHEDULES]
    name, suffix = samplers_mod.split_combined_name(req.sampler_name or "", labels)
    try:
        sampler = samplers_mod.find_sampler(name)
        scheduler = req.scheduler or suffix
        schedule = None if not scheduler or scheduler.lower() == "automatic" \
            else schedules.find_schedule(scheduler)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    if req.hires is not None:
        hires_mod.validate(req, sampler)
    return sampler, schedule


class Engine:
    """Loads models from a folder once and runs generation jobs, one at a time per caller's lock."""

    def __init__(self, models_dir: str | Path, device: str = "cpu", default_model: str | None = None,
                 threads: int = 0, embeddings_dir: str | Path | None = None, lora_dir: str | Path | None = None,
                 checkpoint_cache: int = DEFAULT_OTHERS, model_memory_bytes: int | None = None,
                 cuda: CudaOptions | None = None, io_binding: bool | None = None):
        self.models_dir = Path(models_dir)
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir else None  # textual inversion
        self.loras = lora_mod.LoraLibrary(Path(lora_dir) if lora_dir else None)
        self.device = device
        self.threads = threads
        self.cuda = cuda  # the CUDA execution provider's options (providers.py); None: its defaults
        self.io_binding = io_binding  # whether sessions run through IO binding; None: the device's default
        self.available = scan_models(self.models_dir)
        # The loaded models: the current one + `checkpoint_cache` others (A1111's sd_checkpoint_cache), within
        # `model_memory_bytes` (SDFC_MODEL_MEMORY_MB) when set (model_cache.py).
        self.model_cache = ModelCache(self._open_model, checkpoint_cache, model_memory_bytes)
        self._lock = threading.Lock()
        self._tokenizers: dict = {}  # model name → tokenizer, for request checks of models not loaded
        # Memory headroom, measured once after the first model load; what the models held then is added back,
        # so that the budget follows what they hold now (models loaded, built or evicted since).
        self._headroom: int | None = None
        self._free_without_models: int | None = None
        self._headroom_measured = False
        self.current = self.find_model(default_model) if default_model else self.available[0]

    def refresh(self) -> None:
        self.available = scan_models(self.models_dir)

    def find_model(self, wanted: str) -> ModelInfo:
        for info in self.available:
            if info.matches(wanted):
                return info
        names = ", ".join(i.title for i in self.available)
        raise ModelNotFoundError(f"model {wanted!r} not found; available models: {names}")

    def load(self, wanted: str | None = None) -> OnnxModel:
        """The model `wanted` (default: the current one), from the cache or loaded into it. A job keeps the
        model it got for its whole run, whatever the cache evicts meanwhile."""
        info = self.find_model(wanted) if wanted else self.current
        return self.model_cache.get(info)

    def tokenizer_of(self, wanted: str | None = None):
        """The tokenizer of the model `wanted`, without loading its sessions: request checks run outside the
        queue, and loading a model there would put it beside the one a running job uses."""
        info = self.find_model(wanted) if wanted else self.current
        models = self.model_cache.models()
        if info.name in models:
            return models[info.name].tokenizer
        with self._lock:
            if info.name not in self._tokenizers:
                self._tokenizers[info.name] = load_tokenizer(info)
            return self._tokenizers[info.name]

    def _open_model(self, info: ModelInfo) -> OnnxModel:
        model = OnnxModel(info, self.device, self.threads, cuda=self.cuda, io_binding=self.io_binding)
        embeddings_mod.sync_embeddings(model, sdxl_mod.embeddings_folder(info, self.embeddings_dir))
        return model

    def set_checkpoint_cache(self, others: int) -> None:
        """A1111's sd_checkpoint_cache: how many models stay loaded besides the current one."""
        self.model_cache.set_others(int(others))

    def refresh_loras(self) -> None:
        """POST /refresh-loras: read the LoRA folder again."""
        self.loras.refresh()

    def refresh_embeddings(self) -> None:
        """POST /refresh-embeddings: read the folder again for every loaded model."""
        with self._lock:
            for model in self.model_cache.models().values():
                embeddings_mod.sync_embeddings(model, sdxl_mod.embeddings_folder(model.info, self.embeddings_dir),
                                               force=True)

    def embeddings_of(self, wanted: str | None = None) -> embeddings_mod.EmbeddingDatabase:
        """The embeddings the model `wanted` (default: the current one) loads and skips."""
        return self.load(wanted).embeddings.db

    def memory_budget(self, info: ModelInfo, tiling: bool = False) -> int | None:
        """Bytes one job with model `info` may use: a share of what was free once a model was loaded, with
        what the loaded models held then added back and what they hold now taken off (weights, seamless
        sessions, LoRA sets: model_cache.resident_bytes), as well as `info`'s weights if it is not loaded and
        its seamless sessions if a `tiling` job would build them. None: no figure for this device.
        Measured once, so that the answer does not drift with what the arena keeps between jobs."""
        if not self._headroom_measured:
            self.load(info.name)
            with self._lock:
                if not self._headroom_measured:
                    self._headroom = memory.headroom(self.device)
                    if self._headroom is not None:
                        self._free_without_models = self._headroom + self.model_cache.total_bytes()
                    self._headroom_measured = True
                    log.info("memory headroom after loading %s: %s bytes", info.name, self._headroom)
        if self._headroom is None:
            return None
        loaded = self.model_cache.models()
        held = sum(resident_bytes(model) for model in loaded.values())
        model = loaded.get(info.name)
        if model is None:
            held += info.memory.weights_bytes
        if tiling and (model is None or not model.tiled_resident):
            held += info.memory.tiled_weights_bytes
        return max(0, int(memory.BUDGET_FRACTION * (self._free_without_models - held)))

    def unload(self) -> None:
        """POST /unload-checkpoint: the cache is emptied (a running job keeps its model until it ends)."""
        self.model_cache.clear()

    def generate(self, req: GenerationRequest, control: JobControl | None = None) -> GenerationResult:
        try:
            return self._generate(req, control or JobControl())
        except OutOfMemoryError:
            raise
        except MemoryError as exc:  # numpy or Pillow: the job's arrays are dropped with this frame
            raise OutOfMemoryError(f"not enough memory for this job: {exc}") from None

    def _generate(self, req: GenerationRequest, control: JobControl) -> GenerationResult:
        sampler, schedule = validate(req)
        model = self.load(req.model)
        # Embedding files added, replaced or removed since the last job reach this one (as A1111). Only here,
        # between jobs (the API's queue runs one at a time), so that no job sees the table change under it.
        embeddings_mod.sync_embeddings(model, sdxl_mod.embeddings_folder(model.info, self.embeddings_dir))
        sdxl_mod.check_request(req, model.info, self.embeddings_dir, model.tokenizer)
        refiner = self._refiner(req, model)
        networks = lora_mod.parse_networks(req.prompt)  # as A1111: the batch's first prompt's LoRAs
        if req.tiling:
            model = model.tiled()  # every UNet and VAE call below (encode and decode) wraps around
        lora_infotext = {}
        if networks:  # the UNet and text encoder with these LoRAs merged (sessions cached per set)
            model, lora_infotext = model.loras.model_with(model, networks, self.loras, circular=req.tiling)
        seed, subseed = resolve_seed(req.seed), resolve_seed(req.subseed)
        total = req.batch_size * req.n_iter
        seeds = [seed + (0 if req.subseed_strength else i) for i in range(total)]
        subseeds = [subseed + i for i in range(total)]
        img2img = None
        if req.init_images is not None:
            if not req.init_images:
                raise InvalidRequestError("init_images is empty: img2img needs at least one image")
            # Resize modes, mask, masked content, inpainting conditioning: one batch's worth (inpaint.py).
            img2img = inpaint_mod.prepare(req, model.vae_encode, model.info.unet_in_channels,
                                          seeds[:req.batch_size])
        images, floats, interrupted, refiner_infotext = [], [], False, {}
        passes = 2 if req.hires is not None else 1  # as A1111: the hires pass is a job of its own
        control.job_count, control.job_no = req.n_iter * passes, 0
        for n in range(req.n_iter):
            if control.interrupted:
                break
            control.skipped = False
            control.job_no = n * passes
            batch = slice(n * req.batch_size, (n + 1) * req.batch_size)
            latent_init = img2img.init_latent if img2img is not None else None
            switch = sdxl_mod.RefinerSwitch(refiner, req.refiner_switch_at) if refiner is not None else None
            latents, stopped = self._sample_batch(model, req, sampler, schedule, seeds[batch],
                                                  subseeds[batch], latent_init, control, img2img=img2img,
                                                  refiner=switch)
            # As A1111: once the refiner took over, it is the model that decodes (and the infotext says so).
            decoder = switch.model if switch is not None and switch.done else model
            if decoder is not model:
                refiner_infotext = sdxl_mod.refiner_infotext(decoder.info, req.refiner_switch_at)
            if req.hires is not None:
                latents, stopped = hires_mod.second_pass(self, model, req, sampler, schedule, seeds[batch],
                                                         subseeds[batch], latents, control)
            interrupted |= stopped and control.interrupted
            for row, latent in enumerate(latents):
                image = self._decode(decoder, latent, req.auto_vae_precision)
                floats.append(image)
                image = Image.fromarray((image * 255).astype(np.uint8))
                # Inpainting: the original laid back over everything outside the mask.
                images.append(img2img.finish(image, row) if img2img is not None else image)
        control.sampling_step = control.sampling_steps
        return GenerationResult(
            images=images, float_images=floats, seeds=seeds[: len(images)], subseeds=subseeds[: len(images)],
            prompts=[req.prompt] * len(images), negative_prompts=[req.negative_prompt] * len(images),
            sampler_name=sampler.name, schedule_label=schedule.label if schedule else None,
            model=model.info, request=req, interrupted=interrupted,
            extra_generation_params={**(img2img.infotext if img2img is not None else {}), **lora_infotext,
                                     **embeddings_mod.infotext(control.embeddings_used, model.embeddings),
                                     **refiner_infotext},
        )

    def _refiner(self, req: GenerationRequest, model: OnnxModel) -> OnnxModel | None:
        """The refiner a request names, loaded through the model cache (None: no refiner); unknown → 4xx."""
        if not sdxl_mod.wants_refiner(req):
            return None
        try:
            refiner = self.load(req.refiner_checkpoint)
        except ModelNotFoundError as exc:
            raise InvalidRequestError(f"refiner_checkpoint: {exc}") from None
        embeddings_mod.sync_embeddings(refiner, sdxl_mod.embeddings_folder(refiner.info, self.embeddings_dir))
        sdxl_mod.check_request(req, refiner.info, self.embeddings_dir, refiner.tokenizer)
        return refiner.tiled() if req.tiling else refiner

    def _sample_batch(self, model, req, sampler, schedule, seeds, subseeds, init_latent, control,
                      img2img: inpaint_mod.Img2ImgInit | None = None, refiner: sdxl_mod.RefinerSwitch | None = None):
        shape = (4, req.height // 8, req.width // 8)
        rng = ImageRNG(shape, seeds, subseeds=subseeds, subseed_strength=req.subseed_strength,
                       seed_resize_from_h=req.seed_resize_from_h, seed_resize_from_w=req.seed_resize_from_w,
                       source=req.noise_source, eta_noise_seed_delta=req.eta_noise_seed_delta)
        noise = rng.first()
        if img2img is not None and req.initial_noise_multiplier != 1.0:
            noise = noise * np.float32(req.initial_noise_multiplier)  # A1111: the first noise only
        encoder = self._prompt_encoder(model, req)
        steps, hires_steps = sampler.prompt_schedule_steps(req.steps), None
        if req.hires_base_steps is not None:  # a hires second pass: prompt editing counts in both passes (§1.2)
            steps, hires_steps = req.hires_base_steps, steps
        conditioning = encoder.batch([req.prompt] * len(seeds), [req.negative_prompt] * len(seeds), steps,
                                     hires_steps)
        control.embeddings_used.extend(encoder.chunker.used_embeddings)
        denoiser = CFGDenoiser(model, conditioning, req.cfg_scale, control)
        if refiner is not None:  # the refiner's own conditioning (its encoders), for the same prompts and steps
            refiner.conditioning = self._prompt_encoder(refiner.model, req).batch(
                [req.prompt] * len(seeds), [req.negative_prompt] * len(seeds), steps, hires_steps)
            denoiser.refiner = refiner
        if img2img is not None:
            denoiser.blend, denoiser.image_cond = img2img.blend, img2img.image_cond
        if denoiser.image_cond is None and model.info.unet_in_channels == inpaint_mod.INPAINT_UNET_CHANNELS:
            # txt2img (or a hires pass) on an inpainting UNet: everything is to be painted.
            denoiser.image_cond = inpaint_mod.txt2img_conditioning(model.vae_encode, len(seeds),
                                                                   req.width, req.height)
        control.current_latent = None
        control.preview_factors = model.info.arch.latent_rgb_factors

        def on_step(info: dict) -> None:
            control._step(info["i"] + 1, info["denoised"])

        try:
            if sampler.kind == "timesteps":
                x = self._run_timesteps(model, req, sampler, noise, init_latent, rng, denoiser, control, on_step)
            else:
                x = self._run_sigmas(model, req, sampler, schedule, noise, init_latent, rng, denoiser,
                                     control, on_step)
            stopped = False
        except Interrupted:
            # As A1111: an interrupted batch still returns an image, from the last prediction.
            x = control.current_latent if control.current_latent is not None else noise
            stopped = True
        if denoiser.blend is not None:
            x = denoiser.blend(x)  # as A1111: the known area is the init latent's, exactly
        bad = precision_mod.non_finite_count(x)
        if bad:  # one NaN is as wrong as all (A1111 checks only for all): it spreads over the image in the VAE
            raise NaNError(f"a tensor with NaNs (or infinities: {bad} of {x.size} values) was produced by the UNet "
                           f"of model {model.info.name!r} (try an fp32 model or a lower cfg_scale)")
        return x, stopped

    def _run_sigmas(self, model, req, sampler, schedule, noise, init_latent, rng, denoiser, control, on_step):
        schedule = schedule or schedules.find_schedule(sampler.default_schedule)
        blend = denoiser.blend
        model_sigmas = model.sigmas
        if sampler.model_wrap == "lcm":  # LCM: its own 50-timestep table and output scaling (§3.8)
            model_sigmas = schedules.LCMSigmas(model.sigmas.alphas_cumprod)
            denoiser = samplers_mod.LCMDenoiser(denoiser.eps, model_sigmas)
        if blend is not None:  # k-diffusion: the denoised prediction is blended (A1111)
            denoiser = blend.after(denoiser)
        n, t_enc = samplers_mod.img2img_plan(req.steps, req.denoising_strength, req.img2img_fix_steps) \
            if init_latent is not None else (req.steps, None)
        full = schedule.sigmas(n, model_sigmas, sampler.discard_next_to_last_sigma,
                               sdxl=sdxl_mod.is_sdxl(model.info))  # Align Your Steps has SDXL's own
        sigmas = full
        if init_latent is not None:
            sigmas = full[n - t_enc - 1:]
            x = init_latent + noise * sigmas[0]
        else:
            x = noise * sigmas[0]
        control.sampling_steps = len(sigmas) - 1
        kwargs = {}
        if sampler.uses_eta:
            kwargs["eta"] = req.eta if req.eta is not None else req.eta_ancestral
        # As A1111: churn and noise scale go only to the samplers its `sampler_extra_params` names.
        extra = {"s_churn": req.s_churn, "s_tmin": req.s_tmin, "s_tmax": req.s_tmax or float("inf"),
                 "s_noise": req.s_noise}
        kwargs.update({k: extra[k] for k in sampler.extra_params})
        if sampler.noise == "brownian":
            # One Brownian tree per image seed over the *full* schedule's range, also for img2img (§5.4).
            kwargs["noise"] = BrownianNoise(x.shape[1:], rng.seeds, full[full > 0].min(), full.max(), rng.source)
        else:
            kwargs["noise"] = rng.next
        if "sigma_min" in inspect.signature(sampler.function).parameters:
            # DPM fast/adaptive take a range and a step count, not a schedule (§3.2).
            if init_latent is None:
                kwargs.update(sigma_min=model_sigmas.sigma_min, sigma_max=model_sigmas.sigma_max, n=req.steps)
            else:
                kwargs.update(sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]), n=len(sigmas) - 1)
            if "n" not in inspect.signature(sampler.function).parameters:
                del kwargs["n"]
        else:
            kwargs["sigmas"] = sigmas
        return sampler.function(denoiser, x, callback=on_step, **kwargs)

    def _run_timesteps(self, model, req, sampler, noise, init_latent, rng, denoiser, control, on_step):
        n, t_enc = samplers_mod.img2img_plan(req.steps, req.denoising_strength, req.img2img_fix_steps) \
            if init_latent is not None else (req.steps, None)
        timesteps = samplers_mod.ddim_timesteps(n, model.num_train_timesteps)
        ac = model.sigmas.alphas_cumprod
        if init_latent is not None:
            a = np.float32(ac[timesteps[t_enc]])
            x = init_latent * np.sqrt(a) + noise * np.sqrt(np.float32(1) - a)
            timesteps = timesteps[:t_enc]
        else:
            x = noise
        control.sampling_steps = max(len(timesteps) - 1, 0)
        kwargs = {}
        if sampler.uses_eta:
            kwargs["eta"] = req.eta if req.eta is not None else req.eta_ddim
        if "is_img2img" in inspect.signature(sampler.function).parameters:
            kwargs["is_img2img"] = init_latent is not None  # UniPC starts from the img2img timestep
        eps_model = denoiser.eps
        if sampler.model_wrap == "cfg++":  # DDIM CFG++: scale ÷ 12.5 and the uncond ε (§3.4)
            eps_model = lambda x, t: denoiser.eps_pair(x, t, 1 / 12.5)  # noqa: E731
        if denoiser.blend is not None:  # DDIM family: the UNet's input x is blended (mask_before_denoising)
            eps_model = denoiser.blend.before(eps_model)
        return sampler.function(eps_model, x, timesteps, ac, rng.next, on_step, **kwargs)

    @staticmethod
    def _prompt_encoder(model: OnnxModel, req: GenerationRequest):
        return sdxl_mod.prompt_encoder(model, req) or PromptEncoder(
            model, emphasis=req.emphasis, clip_skip=req.clip_skip, comma_padding_backtrack=req.comma_padding_backtrack)

    @staticmethod
    def _decode(model: OnnxModel, latent: np.ndarray, auto_vae_precision: bool = True) -> np.ndarray:
        """One latent as an (H, W, 3) image in [0, 1]; every value finite, an fp16 VAE's overflow decoded again
        in fp32 when `auto_vae_precision` (precision.py), or a NaNError."""
        decoded = precision_mod.decode_checked(model, latent[None], auto_vae_precision)[0]
        return np.clip((np.moveaxis(decoded, 0, 2) + 1.0) / 2.0, 0.0, 1.0)
