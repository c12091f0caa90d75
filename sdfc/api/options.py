"""The options store behind GET/POST /sdapi/v1/options and per-request `override_settings`.

Options live in the process, as in A1111. In FC every instance has its own: a client that needs a setting
for one job should send it in `override_settings`, which always applies to exactly that job.
"""
from __future__ import annotations

import copy
import math
import threading

from .errors import ApiError

# Keys clients use (a1111-api.md §3), with A1111's defaults. A1111's response model types an option
# whose default is a truthy int as float, so these are floats here too (jpeg_quality: 80.0).
DEFAULTS = {
    "sd_model_checkpoint": None,
    "sd_checkpoint_hash": None,
    "sd_vae": "Automatic",
    "sd_unet": "Automatic",
    "samples_format": "png",
    "jpeg_quality": 80.0,
    "webp_lossless": False,
    "enable_pnginfo": True,
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_version_to_infotext": True,
    "send_seed": True,
    "send_size": True,
    "return_grid": True,
    "grid_only_if_multiple": True,
    "samples_save": False,
    "save_images_add_number": True,
    "live_previews_enable": True,
    "show_progress_every_n_steps": 10.0,
    "live_preview_content": "Prompt",
    "CLIP_stop_at_last_layers": 1.0,
    "eta_noise_seed_delta": 0,
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "s_min_uncond": 0.0,
    "sigma_min": 0.0,
    "sigma_max": 0.0,
    "rho": 0.0,
    "randn_source": "GPU",
    "img2img_fix_steps": False,
    "initial_noise_multiplier": 1.0,
    "inpainting_mask_weight": 1.0,
    "always_discard_next_to_last_sigma": False,
    "use_old_karras_scheduler_sigmas": False,
    "emphasis": "Original",
    "comma_padding_backtrack": 20.0,
    "enable_emphasis": True,
    "face_restoration": False,
    "tiling": False,
    "api_enable_requests": False,   # sdfc never fetches image URLs (see README)
    "api_forbid_local_requests": True,
    "api_useragent": "",
    # Models kept loaded besides the current one (A1111's key and range; its default is 0, sdfc's 1 so that a
    # base and its refiner, or two models used in turn, stay loaded: sdfc/engine/model_cache.py).
    "sd_checkpoint_cache": 1,
    "sd_vae_checkpoint_cache": 0,
    "upscaler_for_img2img": None,
    "img2img_color_correction": False,
    "outdir_samples": "",
    "sd_vae_encode_method": "Full",
    "sd_vae_decode_method": "Full",
    # A1111's "Automatically revert VAE to 32-bit floats": an fp16 VAE's NaNs are decoded again with the fp32
    # decoder; off, they are an error (never A1111's black image). sdfc/engine/precision.py.
    "auto_vae_precision": True,
    # SDXL's size and aesthetic-score conditioning (A1111's "Stable Diffusion XL" section; sdfc/engine/sdxl.py).
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
}

# Values the engine reads; validated on set so that a job never starts with a value it cannot use.
CHOICES = {
    "samples_format": ("png", "jpg", "jpeg", "webp"),
    "randn_source": ("GPU", "CPU", "NV"),
    "emphasis": ("Original", "No norm", "Ignore", "None"),
}
# Numeric options with the ranges of A1111's sliders for them (modules/shared_options.py, v1.10);
# None: unbounded (a gr.Number there). `integer`: the slider steps by 1, or gr.Number(precision=0).
NUMBERS = {
    "jpeg_quality": (1, 100, True),
    "show_progress_every_n_steps": (-1, 32, True),
    "CLIP_stop_at_last_layers": (1, 12, True),
    "eta_noise_seed_delta": (-(2 ** 63), 2 ** 63 - 1, True),
    "eta_ancestral": (0, 1, False),
    "eta_ddim": (0, 1, False),
    "s_churn": (0, 100, False),
    "s_tmin": (0, 10, False),
    "s_tmax": (0, 999, False),
    "s_noise": (0, 1.1, False),
    "s_min_uncond": (0, 15, False),
    "sigma_min": (0, 2, False),
    "sigma_max": (0, 60, False),
    "rho": (None, None, False),
    "initial_noise_multiplier": (0, 1.5, False),
    "inpainting_mask_weight": (0, 1, False),
    "comma_padding_backtrack": (0, 74, True),
    "sd_checkpoint_cache": (0, 10, True),
    "sd_vae_checkpoint_cache": (0, 10, True),
    "sdxl_crop_top": (0, None, True),
    "sdxl_crop_left": (0, None, True),
    "sdxl_refiner_low_aesthetic_score": (None, None, False),
    "sdxl_refiner_high_aesthetic_score": (None, None, False),
}


def _bad(key: str, message: str, value) -> ApiError:
    return ApiError(400, f"option {key} {message}, got {_shown(value)}", error="ValueError")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_number(key: str, value):
    low, high, integer = NUMBERS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, "must be a number", value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(key, "must be a finite number", value)
    if integer and value != int(value):
        raise _bad(key, "must be a whole number", value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _bad(key, f"must be between {low} and {high}", value)
    return value


def check_value(key: str, value):
    """Validate one option with the type of its default and its A1111 range; raise a 400 naming it.

    Returns the value to store. A value that passes here is one every job can use, so a bad POST
    /options cannot break later generations.
    """
    if key not in DEFAULTS:
        raise ApiError(400, f"unknown option {key!r}", error="KeyError", errors=repr(key))
    if key in CHOICES:
        if not isinstance(value, str) or value not in CHOICES[key]:
            raise _bad(key, f"must be one of {', '.join(CHOICES[key])}", value)
        return value
    if key in NUMBERS:
        return _check_number(key, value)
    default = DEFAULTS[key]
    if isinstance(default, bool) and not isinstance(value, bool):
        raise _bad(key, "must be true or false", value)
    if isinstance(default, str) and not isinstance(value, str):
        raise _bad(key, "must be a string", value)
    if default is None and value is not None and not isinstance(value, str):
        raise _bad(key, "must be a string or null", value)
    return value


class Options:
    def __init__(self):
        self._values = copy.deepcopy(DEFAULTS)
        self._lock = threading.Lock()
        self._watchers: dict[str, list] = {}

    def watch(self, key: str, listener) -> None:
        """Call `listener(value)` now and whenever `key` is stored (the engine follows sd_checkpoint_cache)."""
        self._watchers.setdefault(key, []).append(listener)
        listener(self.snapshot()[key])

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._values)

    def update(self, values: dict) -> None:
        checked = {k: check_value(k, v) for k, v in values.items()}
        with self._lock:
            self._values.update(checked)
        for key, value in checked.items():
            for listener in self._watchers.get(key, ()):
                listener(value)

    def with_overrides(self, overrides: dict | None) -> dict:
        """This job's options: the current ones with `override_settings` applied.

        Keys sdfc does not know are ignored (clients send extension settings along); known keys are
        checked, so a bad value is a 400 rather than a surprise in the image.
        """
        merged = self.snapshot()
        for key, value in (overrides or {}).items():
            if key in DEFAULTS:
                merged[key] = check_value(key, value)
        return merged
