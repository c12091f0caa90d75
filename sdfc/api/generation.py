"""txt2img / img2img: an A1111 request (already validated) → engine job → A1111 response.

Routes stay thin: they parse and call `run_generation`; this module owns the translation both ways.
"""
from __future__ import annotations

import base64
import functools
import json
import logging
import time
import uuid
from pathlib import Path

from ..engine import GenerationRequest, GenerationResult, InvalidRequestError, JobControl, ModelNotFoundError
from ..engine import NaNError, OutOfMemoryError
from ..engine import hires as engine_hires
from ..engine import samplers as engine_samplers
from ..engine.pipeline import validate as validate_engine_request
from ..engine import schedules as engine_schedules
from ..engine.lora import parse_networks
from ..engine.prompt_parser import check_prompt
from ..engine.sdxl import NO_REFINER, SizeConditioning
from .errors import ApiError, ValidationFailed
from .images import encode_image_bytes
from . import img2img as img2img_fields
from .limits import check_limits, load_images, open_init_images
from .infotext import SDFC_VERSION, create_infotext, info_json, parse_generation_parameters
from .state import ApiState
from .styles import apply_styles

log = logging.getLogger("sdfc.api")

# Features A1111 has that sdfc does not (yet): refused clearly instead of silently ignored.
UNSUPPORTED_FLAGS = {
    "restore_faces": "face restoration is not supported by sdfc",
}


def _value(values: dict, key: str, fallback):
    """A request value, with A1111's "null means default" rule."""
    v = values.get(key)
    return fallback if v is None else v


def _check_unsupported(values: dict, mode: str) -> None:
    for key, message in UNSUPPORTED_FLAGS.items():
        if values.get(key):
            raise ApiError(400, message, error="NotImplementedError")
    if values.get("script_name"):
        from ..scripts import find_script
        find_script(values["script_name"], mode)  # 422 "Script 'x' not found", as A1111
    for name in (values.get("alwayson_scripts") or {}):
        raise ApiError(422, f"Script '{name}' not found")
    if mode == "img2img":
        img2img_fields.check_fields(values)


def _model_override(state: ApiState, options: dict, overrides: dict | None) -> str | None:
    wanted = (overrides or {}).get("sd_model_checkpoint")
    name = wanted or options.get("sd_model_checkpoint")
    if not name:
        return None
    try:
        return state.engine.find_model(name).name
    except ModelNotFoundError as exc:
        raise ApiError(400, str(exc), error="RuntimeError") from None


# EXIF lives in one JPEG APP1 segment: at most 65533 bytes, of which the UserComment header, its two
# IFDs and the b"UNICODE\0" prefix take 58; the text is UTF-16. The parameter line after the prompts
# is a few hundred characters; PARAMS_ROOM leaves ample margin for it.
JPEG_EXIF_TEXT_BYTES = 65533 - 58
PARAMS_ROOM = 4096


def _model_info(state: ApiState, req: GenerationRequest):
    return state.engine.find_model(req.model) if req.model else state.engine.current


@functools.lru_cache(maxsize=64)
def size_step(model_dir: str) -> int:
    """Pixels that width and height must be a multiple of for this model.

    The VAE scales by 2 per block after the first; the exported UNet halves its latent once per down
    block after the first and doubles it back with fixed factors, so a latent that does not divide
    evenly fails in its skip connections (A1111's torch UNet interpolates instead; ONNX graphs cannot).
    """
    def blocks(component: str, key: str, default: int) -> int:
        try:
            config = json.loads((Path(model_dir) / component / "config.json").read_text())
            return max(1, len(config.get(key) or ()) or default)
        except (OSError, ValueError):
            return default
    vae = 2 ** (blocks("vae_decoder", "block_out_channels", 4) - 1)
    unet = 2 ** (blocks("unet", "down_block_types", 1) - 1)
    return max(8, vae * unet)


def _check_request(state: ApiState, req: GenerationRequest, options: dict) -> None:
    """What the engine would fail on, refused before the job takes the queue (400, A1111's shape)."""
    try:
        # The engine's own checks (sizes a multiple of 8, where A1111 floors silently; sampler and schedule
        # names), so that a v1 request and a task submit are refused before they queue.
        sampler, _ = validate_engine_request(req)
        for network in parse_networks(req.prompt):  # <lora:…> tags: well formed, and the files exist
            state.engine.loras.find(network.name)
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc), error="ValueError") from None
    info = _model_info(state, req)
    step = size_step(str(info.path))
    for name in ("width", "height"):
        value = getattr(req, name)
        if value % step:
            raise ApiError(400, f"{name} must be a multiple of {step} for model {info.name!r}, got {value} "
                                f"(try {max(step, value // step * step)})", error="ValueError")
    if req.hires is not None:  # the second pass's size (hr_scale, or hr_resize_x/y and its crop) as well
        for name, value in zip(("width", "height"), engine_hires.plan(req.width, req.height, req.hires).final_size):
            if value % step:
                raise ApiError(400, f"the hires fix's {name} ({value}, from hr_scale or hr_resize_x/y) must be a "
                                    f"multiple of {step} for model {info.name!r}", error="ValueError")
    if req.init_images is not None and sampler.kind == "timesteps" \
            and engine_samplers.img2img_steps(req.steps, req.denoising_strength) < 1:
        # k-diffusion samplers still run one step here (as A1111); DDIM/PLMS/UniPC would run none.
        raise ApiError(400, f"img2img with {req.sampler_name} runs int(min(denoising_strength, 0.999) × steps) = 0 "
                            f"steps (denoising_strength {req.denoising_strength}, steps {req.steps}): raise either",
                       error="ValueError")
    problem = info.clip_skip_problem(req.clip_skip)
    if problem:
        raise ApiError(400, problem, error="ValueError")
    for name in ("prompt", "negative_prompt"):
        try:
            check_prompt(getattr(req, name), req.steps)
        except InvalidRequestError as exc:
            raise ApiError(400, f"{name}: {exc}", error="ValueError") from None
    if options["samples_format"].lower() in ("jpg", "jpeg") and options["enable_pnginfo"]:
        size = sum(len(getattr(req, n).encode("utf-16-be", "surrogatepass")) for n in ("prompt", "negative_prompt"))
        if size + PARAMS_ROOM > JPEG_EXIF_TEXT_BYTES:
            raise ApiError(400, f"the prompts take {size} bytes in UTF-16: too long for a JPEG's EXIF infotext "
                                f"(at most {JPEG_EXIF_TEXT_BYTES - PARAMS_ROOM}); use samples_format png or webp, "
                                "or enable_pnginfo false", error="ValueError")


def _hires_fix(state: ApiState, values: dict, mode: str) -> engine_hires.HiresFix | None:
    """txt2img's hr_* fields (A1111 1.10's, and Forge's hr_cfg) → the engine's HiresFix; None without enable_hr."""
    if mode != "txt2img" or not values.get("enable_hr"):
        return None
    if values.get("firstphase_width") or values.get("firstphase_height"):
        raise ApiError(400, "firstphase_width/firstphase_height (the legacy hires fix) are not supported: set "
                            "width/height to the first pass and hr_scale or hr_resize_x/y", error="NotImplementedError")
    if values.get("hr_checkpoint_name") not in (None, "", "Use same checkpoint"):
        raise ApiError(400, "hr_checkpoint_name is not supported by sdfc: the second pass uses the first pass's "
                            "model", error="NotImplementedError")
    # As A1111: an empty hires prompt is the prompt; the styles apply to the hires prompts too.
    prompt, negative = apply_styles(state.settings.styles_file, values.get("styles"),
                                    _value(values, "hr_prompt", "") or _value(values, "prompt", ""),
                                    _value(values, "hr_negative_prompt", "") or _value(values, "negative_prompt", ""))
    return engine_hires.HiresFix(
        scale=_value(values, "hr_scale", 2.0), resize_x=_value(values, "hr_resize_x", 0),
        resize_y=_value(values, "hr_resize_y", 0), upscaler=values.get("hr_upscaler"),
        second_pass_steps=_value(values, "hr_second_pass_steps", 0),
        # A1111 1.10 fails (500) without it; sdfc takes the WebUI's default.
        denoising_strength=_value(values, "denoising_strength", engine_hires.DEFAULT_DENOISING_STRENGTH),
        sampler_name=values.get("hr_sampler_name"), scheduler=values.get("hr_scheduler"),
        prompt=prompt, negative_prompt=negative, cfg_scale=values.get("hr_cfg"))


def _refiner_checkpoint(state: ApiState, name) -> str | None:
    """The refiner's model name; an unknown one is refused before the job queues (A1111: "Could not find
    checkpoint with name ...")."""
    if name in NO_REFINER:
        return None
    try:
        return state.engine.find_model(name).name
    except ModelNotFoundError as exc:
        raise ApiError(400, f"refiner_checkpoint: {exc}", error="RuntimeError") from None


def build_request(state: ApiState, values: dict, mode: str, options: dict) -> GenerationRequest:
    _check_unsupported(values, mode)
    init_images, inpainting = None, {}
    if mode == "img2img":
        if not values.get("init_images"):
            raise ApiError(404, "Init image not found")
        init_images = open_init_images(state, values)  # headers only: decoded after the limits pass
        inpainting = img2img_fields.engine_fields(values, options)  # mask (header only), inpainting fields
    prompt, negative = apply_styles(state.settings.styles_file, values.get("styles"),
                                    _value(values, "prompt", ""), _value(values, "negative_prompt", ""))
    req = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=_value(values, "width", 512), height=_value(values, "height", 512),
        steps=_value(values, "steps", 50), cfg_scale=_value(values, "cfg_scale", 7.0),
        sampler_name=values.get("sampler_name") or _value(values, "sampler_index", "Euler"),
        scheduler=values.get("scheduler"),
        seed=_value(values, "seed", -1), subseed=_value(values, "subseed", -1),
        subseed_strength=_value(values, "subseed_strength", 0.0),
        seed_resize_from_w=_value(values, "seed_resize_from_w", -1),
        seed_resize_from_h=_value(values, "seed_resize_from_h", -1),
        batch_size=_value(values, "batch_size", 1), n_iter=_value(values, "n_iter", 1),
        eta=values.get("eta"),
        eta_ancestral=float(options["eta_ancestral"]), eta_ddim=float(options["eta_ddim"]),
        # As in A1111 1.10, k-diffusion samplers read churn/noise from the options, not the request.
        s_churn=float(options["s_churn"]), s_tmin=float(options["s_tmin"]),
        s_tmax=float(options["s_tmax"]), s_noise=float(options["s_noise"]),
        noise_source=options["randn_source"],
        emphasis=options["emphasis"],
        clip_skip=int(options["CLIP_stop_at_last_layers"]),
        comma_padding_backtrack=int(options["comma_padding_backtrack"]),
        eta_noise_seed_delta=int(options["eta_noise_seed_delta"]),
        auto_vae_precision=bool(options["auto_vae_precision"]),
        model=_model_override(state, options, values.get("override_settings")),
        init_images=init_images,
        denoising_strength=_value(values, "denoising_strength", 0.75),
        resize_mode=_value(values, "resize_mode", 0),
        tiling=_value(values, "tiling", options["tiling"]),  # as A1111: null falls back to the option
        hires=_hires_fix(state, values, mode),
        # A1111 1.6+'s refiner, and its SDXL options (sdfc/engine/sdxl.py).
        refiner_checkpoint=_refiner_checkpoint(state, values.get("refiner_checkpoint")),
        refiner_switch_at=values.get("refiner_switch_at"),
        sdxl=SizeConditioning(sdxl_crop_top=int(options["sdxl_crop_top"]),
                              sdxl_crop_left=int(options["sdxl_crop_left"]),
                              sdxl_refiner_low_aesthetic_score=float(options["sdxl_refiner_low_aesthetic_score"]),
                              sdxl_refiner_high_aesthetic_score=float(options["sdxl_refiner_high_aesthetic_score"])),
        **inpainting,
    )
    check_limits(state, req)
    _check_request(state, req, options)
    load_images(req.init_images)
    load_images([req.mask] if req.mask is not None else None, "mask")
    load_images([req.latent_mask] if req.latent_mask is not None else None, "latent_mask")
    return req


def _schedule_label(result: GenerationResult) -> str:
    if result.schedule_label:
        return result.schedule_label
    default = engine_samplers.find_sampler(result.sampler_name).options.get("scheduler")
    return engine_schedules.find_schedule(default).label if default else "Automatic"


def infotext_params(result: GenerationResult, index: int, options: dict, mode: str) -> dict:
    req = result.request
    sampler = engine_samplers.find_sampler(result.sampler_name)
    eta = req.eta if req.eta is not None else (req.eta_ddim if sampler.kind == "timesteps" else req.eta_ancestral)
    default_eta = 0.0 if sampler.kind == "timesteps" else 1.0
    params = {
        "Steps": req.steps,
        "Sampler": result.sampler_name,
        "Schedule type": _schedule_label(result),
        "CFG scale": req.cfg_scale,
        "Seed": result.seeds[index],
        "Size": f"{req.width}x{req.height}",
        "Model hash": result.model.short_hash if options["add_model_hash_to_info"] else None,
        "Model": result.model.name if options["add_model_name_to_info"] else None,
        "Variation seed": result.subseeds[index] if req.subseed_strength else None,
        "Variation seed strength": req.subseed_strength or None,
        "Seed resize from": f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"
        if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0 else None,
        "Denoising strength": req.denoising_strength if mode == "img2img" else None,
        "Conditional mask weight": img2img_fields.conditional_mask_weight(result.model, options),
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        # As A1111: ENSD is reported only where it changes the noise (a sampler using it, with eta != 0).
        "ENSD": req.eta_noise_seed_delta
        if req.eta_noise_seed_delta and eta and sampler.options.get("uses_ensd") else None,
        "RNG": req.noise_source if req.noise_source != "GPU" else None,
        "Tiling": "True" if req.tiling else None,
        # Hires fix: A1111's extra_generation_params from its init() (Denoising strength keeps its place above).
        **(engine_hires.infotext_entries(req, result.sampler_name, result.schedule_label, result.prompts[index],
                                         result.negative_prompts[index]) if req.hires is not None else {}),
        # img2img's from its init() and sample() (Mask blur, Inpaint area, ..., Noise multiplier), added before the
        # sampler adds its eta: A1111's extra_generation_params order.
        **result.extra_generation_params,
        # A1111 names the DDIM family's eta "Eta DDIM" and the k-diffusion one "Eta".
        ("Eta DDIM" if sampler.kind == "timesteps" else "Eta"):
            eta if sampler.uses_eta and eta != default_eta else None,
        "Version": SDFC_VERSION if options["add_version_to_infotext"] else None,
    }
    return params


def _encode(image, fmt: str, infotext: str | None, quality: int) -> bytes:
    try:
        return encode_image_bytes(image, fmt, infotext, jpeg_quality=quality)
    except ValueError:
        if not infotext:
            raise
        # The images exist now: rather than lose them, send this one without its EXIF infotext (the
        # record keeps the text). _check_request refuses the prompts for which this is foreseeable.
        log.warning("infotext of %d characters does not fit a %s's EXIF: image sent without it", len(infotext), fmt)
        return encode_image_bytes(image, fmt, None, jpeg_quality=quality)


def _hires_info(result: GenerationResult) -> dict:
    req = result.request
    if req.hires is None or not result.prompts:
        return {}
    return engine_hires.info_entries(engine_hires.infotext_entries(
        req, result.sampler_name, result.schedule_label, result.prompts[0], result.negative_prompts[0]))


def build_response(state: ApiState, values: dict, mode: str, result: GenerationResult, options: dict,
                   timestamp: str, request_id: str) -> tuple[dict, list[dict]]:
    """The A1111 response and one record per image for the records room."""
    req = result.request
    fmt = options["samples_format"]
    infotexts, images, records = [], [], []
    for i, image in enumerate(result.images):
        text = create_infotext(result.prompts[i], result.negative_prompts[i],
                               infotext_params(result, i, options, mode))
        infotexts.append(text)
        data = _encode(image, fmt, text if options["enable_pnginfo"] else None, int(options["jpeg_quality"]))
        images.append(data)
        records.append({
            "request_id": request_id, "image_index": i, "prompt": result.prompts[i],
            "negative_prompt": result.negative_prompts[i], "steps": req.steps, "seed": result.seeds[i],
            "sampler": result.sampler_name, "cfg_scale": req.cfg_scale, "size": f"{req.width}x{req.height}",
            "model_hash": result.model.short_hash, "model": result.model.name, "infotext": text,
            "image_format": fmt, "image_bytes": data,
        })
    info = info_json(
        prompt=req.prompt, negative_prompt=req.negative_prompt, seed=result.seeds[0] if result.seeds else req.seed,
        subseed=result.subseeds[0] if result.subseeds else req.subseed, subseed_strength=req.subseed_strength,
        width=req.width, height=req.height, sampler_name=result.sampler_name, cfg_scale=req.cfg_scale,
        steps=req.steps, infotexts=infotexts, all_prompts=result.prompts,
        all_negative_prompts=result.negative_prompts, all_seeds=result.seeds, all_subseeds=result.subseeds,
        batch_size=req.batch_size, sd_model_name=result.model.name, sd_model_hash=result.model.short_hash,
        seed_resize_from_w=req.seed_resize_from_w, seed_resize_from_h=req.seed_resize_from_h,
        denoising_strength=req.denoising_strength if mode == "img2img" else
        req.hires.denoising_strength if req.hires is not None else values.get("denoising_strength"),
        extra_generation_params={**_hires_info(result), "Schedule type": _schedule_label(result),
                                 **result.extra_generation_params},
        styles=values.get("styles") or [],
        job_timestamp=timestamp, clip_skip=int(options["CLIP_stop_at_last_layers"]),
        is_using_inpainting_conditioning=img2img_fields.uses_inpainting_conditioning(result.model),
    )
    parameters = dict(values)
    if mode == "img2img" and not values.get("include_init_images"):
        parameters["init_images"] = None
        parameters["mask"] = None
    encoded = [base64.b64encode(d).decode("ascii") for d in images] if _value(values, "send_images", True) else []
    return {"images": encoded, "parameters": parameters, "info": info}, records


# Infotext keys → request fields (A1111 1.8+'s `infotext` request field), with their types.
INFOTEXT_FIELDS = {
    "Prompt": ("prompt", str), "Negative prompt": ("negative_prompt", str), "Steps": ("steps", int),
    "Sampler": ("sampler_name", str), "Schedule type": ("scheduler", str), "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int), "Size-1": ("width", int), "Size-2": ("height", int),
    "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
    "Seed resize from-1": ("seed_resize_from_w", int), "Seed resize from-2": ("seed_resize_from_h", int),
    "Denoising strength": ("denoising_strength", float),
    # Hires fix (A1111's txt2img paste fields; Hires CFG Scale is Forge's)
    "Hires upscale": ("hr_scale", float), "Hires upscaler": ("hr_upscaler", str),
    "Hires steps": ("hr_second_pass_steps", int), "Hires resize-1": ("hr_resize_x", int),
    "Hires resize-2": ("hr_resize_y", int), "Hires checkpoint": ("hr_checkpoint_name", str),
    "Hires sampler": ("hr_sampler_name", str), "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str), "Hires negative prompt": ("hr_negative_prompt", str),
    "Hires CFG Scale": ("hr_cfg", float),
    "Refiner": ("refiner_checkpoint", str), "Refiner switch at": ("refiner_switch_at", float),
}


def _infotext_bool(raw) -> bool:
    """A1111 writes booleans as True/False."""
    if str(raw) not in ("True", "False"):
        raise ValueError(raw)
    return str(raw) == "True"


_infotext_bool.__name__ = "bool"  # named so in the 422 message
INFOTEXT_OPTIONS = {"Clip skip": ("CLIP_stop_at_last_layers", float), "RNG": ("randn_source", str),
                    "ENSD": ("eta_noise_seed_delta", int), "Emphasis": ("emphasis", str),
                    "Tiling": ("tiling", _infotext_bool)}


def apply_infotext(values: dict, explicit: set[str]) -> dict:
    """Fill every field the request did not set explicitly from its `infotext` (as A1111 1.8+)."""
    parsed = parse_generation_parameters(values["infotext"])
    filled = dict(values)

    def convert(kind, raw, key):
        try:
            return kind(float(raw)) if kind is int else kind(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValidationFailed([{"loc": ["body", "infotext"], "type": f"type_error.{kind.__name__}",
                                     "msg": f"infotext value {key}: {str(raw)[:40]!r} is not a valid {kind.__name__}"}]
                                   ) from None

    for key, (field, kind) in INFOTEXT_FIELDS.items():
        if key in parsed and field not in explicit:
            filled[field] = convert(kind, parsed[key], key)
    if "enable_hr" not in explicit and "Denoising strength" in parsed and \
            any(key in parsed for key in ("Hires upscale", "Hires upscaler", "Hires resize-1")):
        filled["enable_hr"] = True  # A1111's paste rule (its parser always adds Hires resize-1)
    overrides = dict(values.get("override_settings") or {})
    for key, (option, kind) in INFOTEXT_OPTIONS.items():
        if key in parsed and option not in overrides:
            overrides[option] = convert(kind, parsed[key], key)
    filled["override_settings"] = overrides or values.get("override_settings")
    return filled


def validate_generation(state: ApiState, values: dict, mode: str) -> None:
    """Every check a generation gets before it runs, without running it (a task is validated at submit)."""
    if values.get("script_name"):
        from ..scripts import prepare_script
        prepare_script(state, values, mode)
        return
    build_request(state, values, mode, state.options.with_overrides(values.get("override_settings")))


def run_generation(state: ApiState, values: dict, mode: str, request_id: str | None = None,
                   control: JobControl | None = None, user: str = "", task_id: str | None = None) -> dict:
    """Queue, generate, answer as A1111; each image's record names its `user` (and `task_id`) and carries
    its share of the engine's seconds and their estimated cost (Settings.pricing)."""
    # `request_id` only correlates logs (FC's id, or a fresh one): each generation's records get their own
    # key, so that no request, whatever headers it sends, can share (and overwrite) another one's rows.
    request_id = request_id or uuid.uuid4().hex
    record_key = uuid.uuid4().hex
    control = control or JobControl()  # a task passes its own, which its keep-alive watches
    if values.get("script_name"):  # a built-in script runs several engine jobs (sdfc/scripts)
        from ..scripts import run_script
        return run_script(state, values, mode, request_id, record_key, control, user, task_id)
    options = state.options.with_overrides(values.get("override_settings"))
    req = build_request(state, values, mode, options)
    with state.queue:
        state.start_job(f"scripts_{mode}", control)
        try:
            engine_started = time.perf_counter()
            result = generate_queued(state, req, control)
            engine_seconds = time.perf_counter() - engine_started
        finally:
            timestamp = state.job.timestamp
            state.end_job()
        keep_overrides(state, values, options)
    response, records = build_response(state, values, mode, result, options, timestamp, record_key)
    deliver_records(state, records, engine_seconds, user, task_id)
    log.info("generated %d image(s) in request %s as record %s", len(result.images), request_id, record_key)
    return response


def generate_queued(state: ApiState, req: GenerationRequest, control) -> GenerationResult:
    """One engine job, inside the queue: the engine's refusals as A1111's 4xx/503."""
    try:
        return state.engine.generate(req, control)
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc), error="ValueError") from None
    except NaNError as exc:
        # A1111 answers its NansException with the reason (which stage, what to change): the engine's own text.
        raise ApiError(500, str(exc), error="NansException") from None
    except OutOfMemoryError as exc:
        # The job's buffers are released with it: the next (smaller, or later) request runs normally.
        log.warning("job ran out of memory: %s", exc)
        raise ApiError(503, f"{exc}; try a smaller size or batch, or again later (lower SDFC_MEMORY_BUDGET "
                            "if this repeats)", error="OutOfMemoryError",
                       headers={"Retry-After": "5"}) from None


def keep_overrides(state: ApiState, values: dict, options: dict) -> None:
    """override_settings_restore_afterwards false: the overrides stay (the checkpoint does not)."""
    if values.get("override_settings") and values.get("override_settings_restore_afterwards") is False:
        state.options.update({k: v for k, v in values["override_settings"].items()
                              if k in options and k != "sd_model_checkpoint"})


def deliver_records(state: ApiState, records: list[dict], engine_seconds: float, user: str,
                    task_id: str | None) -> None:
    per_image = round(engine_seconds / max(1, len(records)), 4)
    for record in records:
        record.update(user=user, task_id=task_id, gpu_seconds=per_image,
                      cost=state.settings.pricing.cost(per_image))
    if state.on_images is not None:
        state.on_images(records)

