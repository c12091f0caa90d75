"""Extras: resize images with weight-free upscalers (the model-based ones need weights sdfc lacks)."""
from __future__ import annotations

import base64

from PIL import Image

from .errors import ApiError
from .images import ImageDecodeError, decode_image, encode_image_bytes

UPSCALERS = {"None": None, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
MAX_OUTPUT_PIXELS = 4096 * 4096


def _upscaler(name: str | None):
    name = name or "None"
    if name not in UPSCALERS:
        raise ApiError(400, f"could not find upscaler named {name!r}; available: {', '.join(UPSCALERS)}")
    return UPSCALERS[name]


def target_size(values: dict, image: Image.Image) -> tuple[int, int]:
    if values.get("resize_mode") == 1:
        return int(values["upscaling_resize_w"]), int(values["upscaling_resize_h"])
    scale = float(values.get("upscaling_resize") or 1)
    return int(image.width * scale), int(image.height * scale)


def _resize(image: Image.Image, size: tuple[int, int], resample, crop: bool) -> Image.Image:
    if resample is None:
        return image
    w, h = size
    if crop and (w * image.height != h * image.width):
        # Scale to cover, then centre-crop to the exact size (A1111's "Crop to fit").
        ratio = max(w / image.width, h / image.height)
        cover = image.resize((max(w, round(image.width * ratio)), max(h, round(image.height * ratio))), resample)
        left, top = (cover.width - w) // 2, (cover.height - h) // 2
        return cover.crop((left, top, left + w, top + h))
    return image.resize((w, h), resample)


def upscale(values: dict, image: Image.Image) -> Image.Image:
    size = target_size(values, image)
    if size[0] < 1 or size[1] < 1 or size[0] * size[1] > MAX_OUTPUT_PIXELS:
        raise ApiError(400, f"upscaled size {size[0]}x{size[1]} is outside 1..{MAX_OUTPUT_PIXELS} pixels",
                       error="LimitExceeded")
    crop = bool(values.get("upscaling_crop")) and values.get("resize_mode") == 1
    first = _resize(image.convert("RGB"), size, _upscaler(values.get("upscaler_1")), crop)
    visibility = float(values.get("extras_upscaler_2_visibility") or 0)
    second_resample = _upscaler(values.get("upscaler_2"))
    if visibility > 0 and second_resample is not None:
        second = _resize(image.convert("RGB"), first.size, second_resample, False)
        first = Image.blend(first, second, min(visibility, 1.0))
    return first


def _decode(value: str) -> Image.Image:
    try:
        return decode_image(value)
    except ImageDecodeError as exc:
        raise ApiError(400, f"Invalid encoded image: {exc}") from None


def _b64(image: Image.Image) -> str:
    return base64.b64encode(encode_image_bytes(image, "png", None)).decode("ascii")


def run_extras_single(values: dict) -> dict:
    if not values.get("image"):
        raise ApiError(404, "Image not found")
    return {"html_info": "", "image": _b64(upscale(values, _decode(values["image"])))}


def run_extras_batch(values: dict) -> dict:
    images = []
    for i, entry in enumerate(values["imageList"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), str):
            raise ApiError(400, f"imageList[{i}] must be an object with a base64 'data' field")
        images.append(_b64(upscale(values, _decode(entry["data"]))))
    return {"html_info": "", "images": images}
