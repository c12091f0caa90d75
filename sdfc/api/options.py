"""The options store behind GET/POST /sdapi/v1/options and per-request `override_settings`.

Options live in the process, as in A1111. In FC every instance has its own: a client that needs a setting
for one job should send it in `override_settings`, which always applies to exactly that job.
"""
from __future__ import annotations

import copy
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
    "sd_checkpoint_cache": 0,
    "sd_vae_checkpoint_cache": 0,
    "upscaler_for_img2img": None,
    "img2img_color_correction": False,
    "outdir_samples": "",
    "sd_vae_encode_method": "Full",
    "sd_vae_decode_method": "Full",
}

# Values the engine reads; validated on set so that a job never starts with a value it cannot use.
CHOICES = {
    "samples_format": ("png", "jpg", "jpeg", "webp"),
    "randn_source": ("GPU", "CPU", "NV"),
    "emphasis": ("Original", "No norm", "Ignore", "None"),
}
NUMBERS = {"jpeg_quality", "CLIP_stop_at_last_layers", "eta_noise_seed_delta", "eta_ancestral", "eta_ddim",
           "s_churn", "s_tmin", "s_tmax", "s_noise", "s_min_uncond", "sigma_min", "sigma_max", "rho",
           "show_progress_every_n_steps", "initial_noise_multiplier", "comma_padding_backtrack"}


def check_value(key: str, value):
    """Validate one option; raise a 400 naming it. Returns the value to store."""
    if key not in DEFAULTS:
        raise ApiError(400, f"unknown option {key!r}", error="KeyError", errors=repr(key))
    if key in CHOICES and value not in CHOICES[key]:
        raise ApiError(400, f"option {key} must be one of {', '.join(CHOICES[key])}, got {value!r}",
                       error="ValueError")
    if key in NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ApiError(400, f"option {key} must be a number, got {value!r}", error="ValueError")
    return value


class Options:
    def __init__(self):
        self._values = copy.deepcopy(DEFAULTS)
        self._lock = threading.Lock()

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._values)

    def update(self, values: dict) -> None:
        checked = {k: check_value(k, v) for k, v in values.items()}
        with self._lock:
            self._values.update(checked)

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
