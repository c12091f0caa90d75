"""Hires fix: txt2img's second pass, as A1111 1.10's StableDiffusionProcessingTxt2Img runs it.

The first pass samples at (width, height). Then, per batch:
  1. a latent upscaler (`upscale.LATENT_UPSCALE_MODES`) interpolates the latents to the target size / 8;
     a pixel upscaler decodes them, resizes the 8-bit images (A1111's resize_image mode 0) and re-encodes;
  2. with both hr_resize_x and hr_resize_y, the latents are centre-cropped to that aspect ratio;
  3. the second pass is an img2img from those latents with a fresh ImageRNG seeded like the first pass
     (its first draw, at the new latent shape), `hr_second_pass_steps or steps` steps counted with
     A1111's fixed-steps rule (img2img_fix_steps), the hires sampler, schedule, prompts and CFG scale;
     denoising_strength 0 runs no step (A1111's schedule is then [0]), so the upscaled latents are decoded.
The images returned are the second pass's; the infotext keeps the first pass's Size and adds the Hires
entries (`infotext_entries`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import samplers as samplers_mod
from . import schedules
from .errors import InvalidRequestError
from .prompt_parser import check_prompt
from .upscale import (DEFAULT_LATENT_UPSCALE_MODE, LATENT_UPSCALE_MODES, PIXEL_UPSCALERS, is_latent_upscaler,
                      upscale_image, upscale_latents)

LATENT_FACTOR = 8  # A1111's opt_f: pixels per latent cell
# A1111 1.10's API sends denoising_strength null unless the client sets it, and hires then fails with a
# TypeError; sdfc uses the WebUI slider's default instead.
DEFAULT_DENOISING_STRENGTH = 0.7
# Names A1111's UI (and infotext) uses for "no override"; taken as such rather than refused.
SAME_SAMPLER, SAME_SCHEDULER = "Use same sampler", "Use same scheduler"


@dataclass
class HiresFix:
    """A1111's hr_* fields (and denoising_strength), as a txt2img request's second pass uses them."""

    scale: float = 2.0                 # hr_scale: used when resize_x and resize_y are both 0
    resize_x: int = 0                  # hr_resize_x / hr_resize_y: an explicit target size
    resize_y: int = 0
    upscaler: str | None = None        # hr_upscaler; None means "Latent" (and no "Hires upscaler" infotext)
    second_pass_steps: int = 0         # 0: the first pass's steps
    denoising_strength: float = DEFAULT_DENOISING_STRENGTH
    sampler_name: str | None = None    # None: the first pass's sampler
    scheduler: str | None = None       # None: the first pass's schedule
    prompt: str = ""                   # "": the first pass's prompt (styles already applied by the caller)
    negative_prompt: str = ""
    cfg_scale: float | None = None     # hr_cfg (Forge's name; A1111 1.10 has none): None = cfg_scale

    @property
    def upscaler_name(self) -> str:
        return self.upscaler if self.upscaler is not None else DEFAULT_LATENT_UPSCALE_MODE


@dataclass(frozen=True)
class HiresPlan:
    """Where the second pass works: A1111's hr_upscale_to_x/y and truncate_x/y."""

    upscale_to: tuple[int, int]        # (w, h) the upscaler aims at
    truncate: tuple[int, int]          # latent (columns, rows) cropped afterwards, split around the centre

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the second pass's latents."""
        w, h = self.upscale_to
        return h // LATENT_FACTOR - self.truncate[1], w // LATENT_FACTOR - self.truncate[0]

    @property
    def final_size(self) -> tuple[int, int]:
        """(w, h) of the returned images."""
        h, w = self.latent_size
        return w * LATENT_FACTOR, h * LATENT_FACTOR


def plan(width: int, height: int, hires: HiresFix) -> HiresPlan:
    """A1111's calculate_target_resolution (without the legacy use_old_hires_fix_width_height option)."""
    rx, ry = hires.resize_x, hires.resize_y
    if rx == 0 and ry == 0:
        return HiresPlan((int(width * hires.scale), int(height * hires.scale)), (0, 0))
    if ry == 0:
        return HiresPlan((rx, rx * height // width), (0, 0))
    if rx == 0:
        return HiresPlan((ry * width // height, ry), (0, 0))
    # Both given: scale to cover the target, then crop the latents to it.
    if width / height < rx / ry:
        to = (rx, rx * height // width)
    else:
        to = (ry * width // height, ry)
    return HiresPlan(to, ((to[0] - rx) // LATENT_FACTOR, (to[1] - ry) // LATENT_FACTOR))


def steps(req) -> int:
    """The second pass's requested steps (hr_second_pass_steps, 0 = the first pass's)."""
    return req.hires.second_pass_steps or req.steps


def _hires_sampler(req) -> samplers_mod.Sampler | None:
    name = req.hires.sampler_name
    return None if name in (None, "", SAME_SAMPLER) else samplers_mod.find_sampler(name)


def second_pass_request(req, first_sampler: samplers_mod.Sampler, first_schedule: schedules.Schedule | None):
    """The second pass as an img2img request of its own (no init images: its latents are passed in)."""
    hires = req.hires
    hr_sampler = _hires_sampler(req) or first_sampler
    scheduler = hires.scheduler if hires.scheduler not in (None, "", SAME_SCHEDULER) else \
        (first_schedule.label if first_schedule else None)  # A1111: hr_scheduler defaults to p.scheduler
    width, height = plan(req.width, req.height, hires).final_size
    return dataclasses.replace(
        req, hires=None, init_images=None, width=width, height=height,
        prompt=hires.prompt or req.prompt, negative_prompt=hires.negative_prompt or req.negative_prompt,
        steps=steps(req), cfg_scale=req.cfg_scale if hires.cfg_scale is None else hires.cfg_scale,
        sampler_name=hr_sampler.name, scheduler=scheduler, denoising_strength=hires.denoising_strength,
        img2img_fix_steps=True,  # A1111 passes an explicit step count: the "fixed steps" rule applies
        hires_base_steps=first_sampler.prompt_schedule_steps(req.steps),  # prompt editing's hires rules
    )


def limits_request(req):
    """What the second pass costs, as a request the size and prompt limits can be checked on."""
    hires = req.hires
    width, height = plan(req.width, req.height, hires).final_size
    return dataclasses.replace(req, hires=None, init_images=None, width=width, height=height, steps=steps(req),
                               prompt=hires.prompt or req.prompt,
                               negative_prompt=hires.negative_prompt or req.negative_prompt)


def validate(req, first_sampler: samplers_mod.Sampler) -> None:
    """Everything about the hires fields the engine would fail on, as InvalidRequestError."""
    hires = req.hires
    if not isinstance(hires, HiresFix):
        raise InvalidRequestError(f"hires must be a HiresFix, got {type(hires).__name__}")
    if req.init_images is not None:
        raise InvalidRequestError("hires fix is for txt2img only")
    if not (isinstance(hires.scale, (int, float)) and math.isfinite(hires.scale) and 1 <= hires.scale <= 8):
        raise InvalidRequestError(f"hr_scale must be between 1 and 8, got {hires.scale!r}")
    for name in ("resize_x", "resize_y", "second_pass_steps"):
        value = getattr(hires, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise InvalidRequestError(f"hr_{name} must be an integer of at least 0, got {value!r}")
    if not (isinstance(hires.denoising_strength, (int, float)) and 0 <= hires.denoising_strength <= 1):
        raise InvalidRequestError(f"denoising_strength must be between 0 and 1, got {hires.denoising_strength!r}")
    if hires.cfg_scale is not None and not math.isfinite(hires.cfg_scale):
        raise InvalidRequestError(f"hr_cfg must be a finite number, got {hires.cfg_scale!r}")
    name = hires.upscaler_name
    if not is_latent_upscaler(name) and name not in PIXEL_UPSCALERS:
        valid = ", ".join([*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS])
        raise InvalidRequestError(f"could not find upscaler named {name!r}; available without model weights: "
                                  f"{valid}")
    try:
        hr_sampler = _hires_sampler(req) or first_sampler
        if hires.scheduler not in (None, "", SAME_SCHEDULER) and hires.scheduler.lower() != "automatic":
            schedules.find_schedule(hires.scheduler)
    except ValueError as exc:
        raise InvalidRequestError(f"hires: {exc}") from None
    p = plan(req.width, req.height, hires)
    w, h = p.final_size
    if min(p.upscale_to) < LATENT_FACTOR or w < LATENT_FACTOR or h < LATENT_FACTOR:
        raise InvalidRequestError(f"hires target size {p.upscale_to[0]}x{p.upscale_to[1]} is too small")
    if not is_latent_upscaler(name) and (p.upscale_to[0] % LATENT_FACTOR or p.upscale_to[1] % LATENT_FACTOR):
        # The image is resized to exactly this size and VAE-encoded: a fraction of a latent cell has no latent.
        raise InvalidRequestError(f"hires target size {p.upscale_to[0]}x{p.upscale_to[1]} must be a multiple of "
                                  f"{LATENT_FACTOR} with the pixel upscaler {name!r}")
    hr_steps = steps(req)
    if hr_sampler.kind == "timesteps" and hr_steps < 2 and hires.denoising_strength > 0:
        # Fixed steps: t_enc = steps - 1 timesteps; DDIM/PLMS/UniPC would run none (A1111 fails there).
        raise InvalidRequestError(f"the hires pass with {hr_sampler.name} needs at least 2 steps, got {hr_steps}")
    for what, text in (("hr_prompt", hires.prompt), ("hr_negative_prompt", hires.negative_prompt)):
        try:
            check_prompt(text, hr_steps)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{what}: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# The second pass


def _crop(latents: np.ndarray, truncate: tuple[int, int]) -> np.ndarray:
    tx, ty = truncate
    _, _, h, w = latents.shape
    return latents[:, :, ty // 2:h - (ty + 1) // 2, tx // 2:w - (tx + 1) // 2]


def _pixel_upscale(engine, model, latents: np.ndarray, size: tuple[int, int], upscaler: str,
                   auto_vae_precision: bool = True) -> np.ndarray:
    """Decode, resize the 8-bit images, encode again (A1111: truncation to uint8, images in [0, 1] → [-1, 1])."""
    encoded = []
    for latent in latents:  # one image at a time: one decoded image alive
        image = Image.fromarray((engine._decode(model, latent, auto_vae_precision) * 255).astype(np.uint8))
        image = upscale_image(image, size[0], size[1], upscaler)
        pixels = np.moveaxis(np.asarray(image, dtype=np.float32) / np.float32(255), 2, 0)
        encoded.append(model.vae_encode((pixels * 2 - 1)[None])[0])
    return np.stack(encoded)


def upscale(engine, model, req, latents: np.ndarray) -> np.ndarray:
    """The first pass's latents, upscaled (and cropped) to the second pass's latent size."""
    p = plan(req.width, req.height, req.hires)
    name = req.hires.upscaler_name
    if is_latent_upscaler(name):
        w, h = p.upscale_to
        up = upscale_latents(latents, (h // LATENT_FACTOR, w // LATENT_FACTOR), name)
    else:
        up = _pixel_upscale(engine, model, latents, p.upscale_to, name, req.auto_vae_precision)
    return np.ascontiguousarray(_crop(up, p.truncate), dtype=np.float32)


def second_pass(engine, model, req, sampler, schedule, seeds, subseeds, latents, control):
    """Run the second pass on one batch's first-pass latents: (latents, stopped) as `_sample_batch`."""
    from .pipeline import validate as validate_request  # pipeline imports this module

    if control.interrupted:
        return latents, True  # A1111's sample_hr_pass: interrupted → the first pass's samples, unchanged
    upscaled = upscale(engine, model, req, latents)
    control.job_no += 1  # A1111's state.nextjob() between the upscale and the second pass
    derived = second_pass_request(req, sampler, schedule)
    hr_sampler, hr_schedule = validate_request(derived)
    if control.skipped:
        # A1111 clears `skipped` only per iteration: the second pass stops at its first model call and
        # returns its start latent, the upscaled one.
        return upscaled, True
    if req.hires.denoising_strength == 0:
        # A1111: a schedule of int(steps / 0) = 0 steps is [0]: no step runs, the upscaled latents come back
        # (A1111's own API test sends this).
        return upscaled, False
    return engine._sample_batch(model, derived, hr_sampler, hr_schedule, seeds, subseeds, upscaled, control)


# ---------------------------------------------------------------------------------------------------
# Infotext: A1111's extra_generation_params for hires, in the order its init() inserts them


def _schedule_written(sampler: samplers_mod.Sampler, schedule: schedules.Schedule | None) -> str | None:
    """The label A1111's get_sigmas writes for a pass: the explicit schedule's, else the sampler's default
    scheduler's; None where 'Automatic' means the model's own discretisation (nothing is written)."""
    if sampler.kind == "timesteps":  # DDIM, PLMS, UniPC...: no schedule, nothing written
        return None
    if schedule is not None:
        return schedule.label
    default = sampler.options.get("scheduler")
    return schedules.find_schedule(default).label if default else None


def infotext_entries(req, sampler_name: str, schedule_label: str | None, prompt: str,
                     negative_prompt: str) -> dict:
    """`Denoising strength` and the Hires entries for one image (None values are left out by the writer).

    `sampler_name`, `schedule_label`: the first pass's sampler and explicit schedule (None: Automatic), as
    GenerationResult has them; `prompt`, `negative_prompt`: this image's first-pass prompts, against which
    A1111 compares the hires prompts.
    """
    hires = req.hires
    first_sampler = samplers_mod.find_sampler(sampler_name)
    first_schedule = schedules.find_schedule(schedule_label) if schedule_label else None
    derived = second_pass_request(req, first_sampler, first_schedule)
    hr_schedule = None if not derived.scheduler or derived.scheduler.lower() == "automatic" \
        else schedules.find_schedule(derived.scheduler)
    first_written = _schedule_written(first_sampler, first_schedule)
    hr_written = _schedule_written(samplers_mod.find_sampler(derived.sampler_name), hr_schedule)
    explicit_size = bool(hires.resize_x or hires.resize_y)
    return {
        "Denoising strength": hires.denoising_strength,
        "Hires sampler": hires.sampler_name if hires.sampler_name not in (None, "", SAME_SAMPLER)
        and hires.sampler_name != sampler_name else None,
        "Hires prompt": derived.prompt if derived.prompt != prompt else None,
        "Hires negative prompt": derived.negative_prompt if derived.negative_prompt != negative_prompt else None,
        # Forge's entry for hr_cfg (A1111 1.10 has neither): written when the request sets it.
        "Hires CFG Scale": hires.cfg_scale,
        # A1111 writes it during the second pass, where it differs from what the first pass wrote.
        "Hires schedule type": hr_written if hr_written is not None and hr_written != first_written else None,
        "Hires upscale": None if explicit_size else float(hires.scale),
        "Hires resize": f"{hires.resize_x}x{hires.resize_y}" if explicit_size else None,
        "Hires steps": hires.second_pass_steps or None,
        "Hires upscaler": hires.upscaler,
    }


def info_entries(entries: dict) -> dict:
    """The same entries as the `info` JSON's extra_generation_params has them: A1111 keeps the hires prompts
    as callables there (JSON null) and its "Hires schedule type" placeholder even when it stays None."""
    out = {}
    for key, value in entries.items():
        if key in ("Hires prompt", "Hires negative prompt"):
            out[key] = None
        elif value is not None or key == "Hires schedule type":
            out[key] = value
    return out
