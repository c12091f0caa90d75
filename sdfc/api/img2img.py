"""img2img's own request fields (mask, inpainting, noise multiplier) → engine, and back into the infotext.

A1111 1.10's semantics (modules/processing.py StableDiffusionProcessingImg2Img, modules/api/api.py):
`mask_blur`, when an integer, sets both `mask_blur_x` and `mask_blur_y`; `initial_noise_multiplier` null
takes the option; `inpainting_mask_weight` is an option; `image_cfg_scale` is read only by instruct-pix2pix
("edit") models, which sdfc does not serve, so a value is refused rather than dropped. `latent_mask`
(A1111's API passes the string on undecoded and fails; its scripts set an image) is decoded like `mask` and
used as A1111's processing uses p.latent_mask (engine/inpaint.py).
"""
from __future__ import annotations

from ..engine import inpaint as engine_inpaint
from ..engine.models import ModelInfo
from .errors import ApiError
from .limits import open_request_image


# A1111's UI default, sent by clients on every img2img (webuiapi): it asks for nothing, so it passes; any other
# value asks for an edit model's image guidance and is refused.
IMAGE_CFG_SCALE_DEFAULT = 1.5


def _value(values: dict, key: str, fallback):
    v = values.get(key)
    return fallback if v is None else v


def check_fields(values: dict) -> None:
    """Refuse (400) what sdfc cannot honour, before anything is decoded."""
    if values.get("image_cfg_scale") not in (None, IMAGE_CFG_SCALE_DEFAULT):
        raise ApiError(400, "image_cfg_scale is used only by instruct-pix2pix (edit) models, which sdfc does not "
                            f"serve: send null (or {IMAGE_CFG_SCALE_DEFAULT}, A1111's default, which clients such "
                            "as webuiapi always send)", error="NotImplementedError")


def engine_fields(values: dict, options: dict) -> dict:
    """GenerationRequest keyword arguments for the mask and inpainting fields (the mask opened from its
    header only: `load_mask` decodes it once the limits have passed)."""
    blur = values.get("mask_blur")
    blur_x, blur_y = (blur, blur) if blur is not None else \
        (_value(values, "mask_blur_x", 4), _value(values, "mask_blur_y", 4))
    mask = open_request_image(values["mask"], "mask") if values.get("mask") else None
    latent_mask = open_request_image(values["latent_mask"], "latent_mask") if values.get("latent_mask") else None
    return dict(
        mask=mask, latent_mask=latent_mask,
        inpaint=engine_inpaint.InpaintOptions(
            mask_blur_x=blur_x, mask_blur_y=blur_y,
            mask_round=bool(_value(values, "mask_round", True)),
            inpainting_fill=_value(values, "inpainting_fill", engine_inpaint.FILL),
            inpaint_full_res=bool(_value(values, "inpaint_full_res", True)),
            inpaint_full_res_padding=_value(values, "inpaint_full_res_padding", 0),
            inpainting_mask_invert=bool(_value(values, "inpainting_mask_invert", False)),
            mask_weight=float(options["inpainting_mask_weight"])),
        initial_noise_multiplier=float(_value(values, "initial_noise_multiplier",
                                              options["initial_noise_multiplier"])),
    )


def uses_inpainting_conditioning(info: ModelInfo) -> bool:
    return info.unet_in_channels == engine_inpaint.INPAINT_UNET_CHANNELS


def conditional_mask_weight(info: ModelInfo, options: dict):
    """A1111's "Conditional mask weight": written whenever an inpainting UNet got its conditioning (txt2img too)."""
    return float(options["inpainting_mask_weight"]) if uses_inpainting_conditioning(info) else None
