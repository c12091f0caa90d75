"""The A1111 v1.10 request models (a1111-api.md §1.3, §1.4), in schema order, with the API's defaults.

The order matters: `parameters` in a generation response echoes the request in this order.
"""
from __future__ import annotations

from .schema import Field as F
from .schema import Model

# Fields shared by txt2img and img2img, from `prompt` to `comments` (base-class defaults win).
_COMMON_HEAD = (
    F("prompt", "str", ""),
    F("negative_prompt", "str", ""),
    F("styles", "list", None, "names of saved prompt styles", items="str"),
    F("seed", "int", -1, "-1 means random"),
    F("subseed", "int", -1),
    F("subseed_strength", "float", 0),
    F("seed_resize_from_h", "int", -1),
    F("seed_resize_from_w", "int", -1),
    F("sampler_name", "str", None, "falls back to sampler_index"),
    F("scheduler", "str", None, "schedule label or name; Automatic when empty"),
    F("batch_size", "int", 1),
    F("n_iter", "int", 1),
    F("steps", "int", 50),
    F("cfg_scale", "float", 7.0),
    F("width", "int", 512),
    F("height", "int", 512),
    F("restore_faces", "bool", None),
    F("tiling", "bool", None),
    F("do_not_save_samples", "bool", False),
    F("do_not_save_grid", "bool", False),
    F("eta", "float", None),
    F("denoising_strength", "float", None),
    F("s_min_uncond", "float", None),
    F("s_churn", "float", None),
    F("s_tmax", "float", None),
    F("s_tmin", "float", None),
    F("s_noise", "float", None),
    F("override_settings", "dict", None),
    F("override_settings_restore_afterwards", "bool", True),
    F("refiner_checkpoint", "str", None),
    F("refiner_switch_at", "float", None),
    F("disable_extra_networks", "bool", False),
    F("firstpass_image", "str", None),
    F("comments", "dict", None),
)

_TXT2IMG_ONLY = (
    F("enable_hr", "bool", False),
    F("firstphase_width", "int", 0),
    F("firstphase_height", "int", 0),
    F("hr_scale", "float", 2.0),
    F("hr_upscaler", "str", None),
    F("hr_second_pass_steps", "int", 0),
    F("hr_resize_x", "int", 0),
    F("hr_resize_y", "int", 0),
    F("hr_checkpoint_name", "str", None),
    F("hr_sampler_name", "str", None),
    F("hr_scheduler", "str", None),
    F("hr_prompt", "str", ""),
    F("hr_negative_prompt", "str", ""),
    F("force_task_id", "str", None),
)

_IMG2IMG_ONLY = (
    F("init_images", "list", None, "base64 or data-URI images", items="str"),
    F("resize_mode", "int", 0),
    F("image_cfg_scale", "float", None),
    F("mask", "str", None),
    F("mask_blur_x", "int", 4),
    F("mask_blur_y", "int", 4),
    F("mask_blur", "int", None),
    F("mask_round", "bool", True),
    F("inpainting_fill", "int", 0),
    F("inpaint_full_res", "bool", True),
    F("inpaint_full_res_padding", "int", 0),
    F("inpainting_mask_invert", "int", 0),
    F("initial_noise_multiplier", "float", None),
    F("latent_mask", "str", None),
    F("force_task_id", "str", None),
)

_COMMON_TAIL = (
    F("sampler_index", "str", "Euler", "legacy sampler field, used when sampler_name is empty"),
    F("script_name", "str", None),
    F("script_args", "list", []),
    F("send_images", "bool", True),
    F("save_images", "bool", False),
    F("alwayson_scripts", "dict", {}),
    F("infotext", "str", None),
)

TXT2IMG = Model("StableDiffusionProcessingTxt2Img", _COMMON_HEAD + _TXT2IMG_ONLY + _COMMON_TAIL)
IMG2IMG = Model(
    "StableDiffusionProcessingImg2Img",
    tuple(F("denoising_strength", "float", 0.75) if f.name == "denoising_strength" else f
          for f in _COMMON_HEAD) + _IMG2IMG_ONLY + (F("include_init_images", "bool", False),) + _COMMON_TAIL,
)

_EXTRAS = (
    F("resize_mode", "int", 0, "0 scales by upscaling_resize, 1 resizes to upscaling_resize_w/h"),
    F("show_extras_results", "bool", True),
    F("gfpgan_visibility", "float", 0),
    F("codeformer_visibility", "float", 0),
    F("codeformer_weight", "float", 0),
    F("upscaling_resize", "float", 2),
    F("upscaling_resize_w", "int", 512),
    F("upscaling_resize_h", "int", 512),
    F("upscaling_crop", "bool", True),
    F("upscaler_1", "str", "None"),
    F("upscaler_2", "str", "None"),
    F("extras_upscaler_2_visibility", "float", 0),
    F("upscale_first", "bool", False),
)
EXTRAS_SINGLE = Model("ExtrasSingleImageRequest", _EXTRAS + (F("image", "str", ""),))
EXTRAS_BATCH = Model("ExtrasBatchImagesRequest", _EXTRAS + (F("imageList", "list", None, required=True),))
PNG_INFO = Model("PNGInfoRequest", (F("image", "str", None, required=True),))
INTERROGATE = Model("InterrogateRequest", (F("image", "str", ""), F("model", "str", "clip")))
