"""The A1111 v1.10 request models (a1111-api.md §1.3, §1.4), in schema order, with the API's defaults.

The order matters: `parameters` in a generation response echoes the request in this order.
"""
from __future__ import annotations

from ..engine.inpaint import MAX_MASK_BLUR
from .schema import Field as F
from .schema import Model

# `strings=False`: sizes, steps and counts that the server limits beyond ge/le (SDFC_MAX_*, pixel products)
# take numbers only, as every float does (schema.py: a numeric string cannot carry those limits).
# A job name is a task key (sdfc/jobs): 1-64 letters, digits and ()_.:-, or empty for none.
TASK_ID_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9()_.:-]{0,63})?$"
TASK_ID_TEXT = "names the job, so that /internal/progress and /sdapi/v2/tasks follow it (empty: no name)"
# Seeds span torch.Generator.manual_seed's range (A1111 passes them there); -1 means random.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
# CFG scale: A1111's slider goes to 30; far larger scales overflow the UNet's output to NaN.
CFG_SCALE_MAX = 100.0

# Fields shared by txt2img and img2img, from `prompt` to `comments` (base-class defaults win).
_COMMON_HEAD = (
    F("prompt", "str", ""),
    F("negative_prompt", "str", ""),
    F("styles", "list", None, "names of saved prompt styles", items="str"),
    F("seed", "int", -1, "-1 means random", ge=SEED_MIN, le=SEED_MAX),
    F("subseed", "int", -1, ge=SEED_MIN, le=SEED_MAX),
    F("subseed_strength", "float", 0, ge=0, le=1),
    F("seed_resize_from_h", "int", -1, "0 or -1: off", ge=-1, strings=False),
    F("seed_resize_from_w", "int", -1, "0 or -1: off", ge=-1, strings=False),
    F("sampler_name", "str", None, "falls back to sampler_index"),
    F("scheduler", "str", None, "schedule label or name; Automatic when empty"),
    F("batch_size", "int", 1, ge=1, strings=False),
    F("n_iter", "int", 1, ge=1, strings=False),
    F("steps", "int", 50, ge=1, strings=False),
    F("cfg_scale", "float", 7.0, ge=0, le=CFG_SCALE_MAX),
    F("width", "int", 512, "a multiple of 8 (and of the model's size step)", ge=8, strings=False),
    F("height", "int", 512, "a multiple of 8 (and of the model's size step)", ge=8, strings=False),
    F("restore_faces", "bool", None),
    F("tiling", "bool", None, "seamless, tileable images: the UNet and VAE convolutions wrap around "
                               "(null: the tiling option)"),
    F("do_not_save_samples", "bool", False),
    F("do_not_save_grid", "bool", False),
    F("eta", "float", None, ge=0, le=1),
    F("denoising_strength", "float", None, ge=0, le=1),
    F("s_min_uncond", "float", None, ge=0, le=15),
    F("s_churn", "float", None, ge=0, le=100),
    F("s_tmax", "float", None, ge=0, le=999),
    F("s_tmin", "float", None, ge=0, le=10),
    F("s_noise", "float", None, ge=0, le=1.1),
    F("override_settings", "dict", None),
    F("override_settings_restore_afterwards", "bool", True),
    F("refiner_checkpoint", "str", None, "a model (name, title or hash) that finishes sampling (A1111 1.6+); "
                                         "unknown: 400; not with enable_hr or LoRAs"),
    F("refiner_switch_at", "float", None, "the refiner takes over at the first step whose timestep t has "
                                          "(999 - t)/1000 >= this; null: from the first step", ge=0, le=1),
    F("disable_extra_networks", "bool", False),
    F("firstpass_image", "str", None),
    F("comments", "dict", None),
)

_TXT2IMG_ONLY = (
    F("enable_hr", "bool", False),
    F("firstphase_width", "int", 0, ge=0),
    F("firstphase_height", "int", 0, ge=0),
    F("hr_scale", "float", 2.0, ge=1, le=8),
    F("hr_upscaler", "str", None),
    F("hr_second_pass_steps", "int", 0, ge=0, strings=False),
    F("hr_resize_x", "int", 0, ge=0, strings=False),
    F("hr_resize_y", "int", 0, ge=0, strings=False),
    F("hr_checkpoint_name", "str", None),
    F("hr_sampler_name", "str", None),
    F("hr_scheduler", "str", None),
    F("hr_prompt", "str", ""),
    F("hr_negative_prompt", "str", ""),
    F("hr_cfg", "float", None, "the second pass's CFG scale (Forge's field; null: cfg_scale)", ge=0,
      le=CFG_SCALE_MAX),
    F("force_task_id", "str", None, TASK_ID_TEXT, pattern=TASK_ID_PATTERN),
)

# A1111's slider maximum (its API takes more; a blur that size costs 5·σ taps per pixel and pass).
MASK_BLUR_TEXT = f"pixels, at most {MAX_MASK_BLUR}"

_IMG2IMG_ONLY = (
    F("init_images", "list", None, "base64 or data-URI images", items="str"),
    F("resize_mode", "int", 0, ge=0, le=3),
    F("image_cfg_scale", "float", None, ge=0, le=CFG_SCALE_MAX),
    F("mask", "str", None),
    F("mask_blur_x", "int", 4, MASK_BLUR_TEXT, ge=0, le=MAX_MASK_BLUR),
    F("mask_blur_y", "int", 4, MASK_BLUR_TEXT, ge=0, le=MAX_MASK_BLUR),
    F("mask_blur", "int", None, MASK_BLUR_TEXT, ge=0, le=MAX_MASK_BLUR),
    F("mask_round", "bool", True),
    F("inpainting_fill", "int", 0, ge=0, le=3),
    F("inpaint_full_res", "bool", True),
    F("inpaint_full_res_padding", "int", 0, ge=0),
    # An int in A1111, whose pydantic takes true/false for it (A1111's own tests send false): 0/1 or a bool.
    F("inpainting_mask_invert", "bool", 0),
    F("initial_noise_multiplier", "float", None, ge=0, le=1.5),
    F("latent_mask", "str", None),
    F("force_task_id", "str", None, TASK_ID_TEXT, pattern=TASK_ID_PATTERN),
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
    tuple(F("denoising_strength", "float", 0.75, ge=0, le=1) if f.name == "denoising_strength" else f
          for f in _COMMON_HEAD) + _IMG2IMG_ONLY + (F("include_init_images", "bool", False),) + _COMMON_TAIL,
)

# As A1111's ExtrasBaseRequest: typed fields with defaults (null is refused) and its ge/le bounds.
_EXTRAS = (
    F("resize_mode", "int", 0, "0 scales by upscaling_resize, 1 resizes to upscaling_resize_w/h",
      choices=(0, 1), nullable=False),
    F("show_extras_results", "bool", True, nullable=False),
    F("gfpgan_visibility", "float", 0, ge=0, le=1, nullable=False),
    F("codeformer_visibility", "float", 0, ge=0, le=1, nullable=False),
    F("codeformer_weight", "float", 0, ge=0, le=1, nullable=False),
    F("upscaling_resize", "float", 2, ge=1, le=8, nullable=False),
    F("upscaling_resize_w", "int", 512, ge=1, nullable=False, strings=False),
    F("upscaling_resize_h", "int", 512, ge=1, nullable=False, strings=False),
    F("upscaling_crop", "bool", True, nullable=False),
    F("upscaler_1", "str", "None"),
    F("upscaler_2", "str", "None"),
    F("extras_upscaler_2_visibility", "float", 0, ge=0, le=1, nullable=False),
    F("upscale_first", "bool", False, nullable=False),
)
EXTRAS_SINGLE = Model("ExtrasSingleImageRequest", _EXTRAS + (F("image", "str", "", nullable=False),))
EXTRAS_BATCH = Model("ExtrasBatchImagesRequest",
                     _EXTRAS + (F("imageList", "list", None, "[{data: base64, name}]", required=True, items="dict"),))
PNG_INFO = Model("PNGInfoRequest", (F("image", "str", None, required=True),))
INTERROGATE = Model("InterrogateRequest", (F("image", "str", ""), F("model", "str", "clip")))
