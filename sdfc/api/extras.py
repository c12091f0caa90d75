"""Extras: resize images with weight-free upscalers (the model-based ones need weights sdfc lacks)."""
from __future__ import annotations

import base64

from PIL import Image

from ..engine.upscale import PIXEL_UPSCALERS as UPSCALERS  # one table: /upscalers, extras and hires fix
from .errors import ApiError
from .images import ImageDecodeError, encode_image_bytes, load_image, open_image_header

MAX_OUTPUT_PIXELS = 4096 * 4096
# A batch's results are all held until the response is written: their sum is bounded too (~200 MB as RGB).
MAX_BATCH_OUTPUT_PIXELS = 4 * MAX_OUTPUT_PIXELS
DEFAULT_MAX_IMAGES = 16  # SDFC_MAX_IMAGES's default


def _upscaler(name: str | None):
    name = "None" if name is None else name  # "" is no upscaler name (A1111 asserts on it too)
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


def check_output_size(values: dict, image: Image.Image) -> tuple[int, int]:
    size = target_size(values, image)
    if size[0] < 1 or size[1] < 1 or size[0] * size[1] > MAX_OUTPUT_PIXELS:
        raise ApiError(400, f"upscaled size {size[0]}x{size[1]} is outside 1..{MAX_OUTPUT_PIXELS} pixels",
                       error="LimitExceeded")
    return size


def upscale(values: dict, image: Image.Image) -> Image.Image:
    size = check_output_size(values, image)
    crop = bool(values.get("upscaling_crop")) and values.get("resize_mode") == 1
    first = _resize(image.convert("RGB"), size, _upscaler(values.get("upscaler_1")), crop)
    visibility = float(values.get("extras_upscaler_2_visibility") or 0)
    second_resample = _upscaler(values.get("upscaler_2"))
    if visibility > 0 and second_resample is not None:
        second = _resize(image.convert("RGB"), first.size, second_resample, False)
        first = Image.blend(first, second, min(visibility, 1.0))
    return first


def _open(value, where: str = "image") -> Image.Image:
    """The image from its header only (size checked, no pixel decoded): see _decoded."""
    try:
        return open_image_header(value)
    except ImageDecodeError as exc:
        raise ApiError(400, f"Invalid encoded image: {where}: {exc}") from None


def _decoded(image: Image.Image, where: str = "image") -> Image.Image:
    try:
        return load_image(image)
    except ImageDecodeError as exc:
        raise ApiError(400, f"Invalid encoded image: {where}: {exc}") from None


def _b64(image: Image.Image) -> str:
    return base64.b64encode(encode_image_bytes(image, "png", None)).decode("ascii")


def check_request(values: dict) -> None:
    """What can be refused without an image: the upscaler names (an empty batch is still checked)."""
    _upscaler(values.get("upscaler_1"))
    _upscaler(values.get("upscaler_2"))


def run_extras_single(values: dict) -> dict:
    check_request(values)
    if not values.get("image"):
        raise ApiError(404, "Image not found")
    image = _open(values["image"])
    check_output_size(values, image)  # before decoding: refused sizes cost no pixel memory
    return {"html_info": "", "image": _b64(upscale(values, _decoded(image)))}


def run_extras_batch(values: dict, max_images: int = DEFAULT_MAX_IMAGES) -> dict:
    check_request(values)
    entries = values["imageList"]
    if len(entries) > max_images:
        raise ApiError(400, f"imageList has {len(entries)} images, over the limit of {max_images} per request "
                            "(SDFC_MAX_IMAGES)", error="LimitExceeded")
    # Every header and output size is checked before the first image is decoded; then one image at a
    # time is decoded, resized and encoded, so at most one decoded image is alive.
    opened, total = [], 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), str):
            raise ApiError(400, f"imageList[{i}] must be an object with a base64 'data' field")
        image = _open(entry["data"], f"imageList[{i}]")
        w, h = check_output_size(values, image)
        total += w * h
        opened.append(image)
    if total > MAX_BATCH_OUTPUT_PIXELS:
        raise ApiError(400, f"the upscaled images add up to {total} pixels, over the limit of "
                            f"{MAX_BATCH_OUTPUT_PIXELS} per request", error="LimitExceeded")
    images = []
    for i in range(len(opened)):
        image, opened[i] = opened[i], None  # drop each source once it is used
        images.append(_b64(upscale(values, _decoded(image, f"imageList[{i}]"))))
    return {"html_info": "", "images": images}
