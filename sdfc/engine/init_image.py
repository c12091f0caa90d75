"""img2img init images as A1111 1.10 prepares them: flattening, the four resize modes, pixels to arrays.

resize_mode (A1111 modules/images.py `resize_image`, with `upscaler_for_img2img` unset, so every resize
is Pillow's Lanczos):
    0 Just resize               stretch to the job's size
    1 Crop and resize           scale to cover the size (aspect kept), centre, crop the excess
    2 Resize and fill           scale to fit inside (aspect kept), centre, fill the bands by stretching
                                the image's first/last row (or column) across them
    3 Just resize (latent upscale)  the pixels are encoded at their own size and the latent is resized
                                bilinearly (torch's interpolate, align_corners False) to the job's size
The pixel operations are Pillow's own, in the order A1111 calls them, so results are identical bytes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .upscale import interpolate

RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
LATENT_UPSCALE = 3
BACKGROUND = "#ffffff"  # A1111's option img2img_background_color: what transparency becomes


def flatten(image: Image.Image, background: str = BACKGROUND) -> Image.Image:
    """An RGB image: transparent pixels composited over `background` (A1111 `images.flatten`)."""
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, background)
        canvas.paste(image, mask=image)
        image = canvas
    return image.convert("RGB")


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at width x height by resize mode 0, 1 or 2 (3 is 2 here, as in A1111, for masks)."""
    if image.mode == "RGBA":
        image = image.convert("RGB")
    if mode == 0:
        return image.resize((width, height), resample=Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == 1
    # Cover (1) spans the width when the target is relatively wider; fit (2, 3) when it is narrower.
    wide = ratio > src_ratio if cover else ratio < src_ratio
    src_w = width if wide else image.width * height // image.height
    src_h = image.height * width // image.width if wide else height
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    # A1111 pastes onto an RGB canvas; a mask (mode L) keeps its grey values either way.
    out = Image.new("L" if resized.mode == "L" else "RGB", (width, height))
    left, top = width // 2 - src_w // 2, height // 2 - src_h // 2
    out.paste(resized, box=(left, top))
    if cover:
        return out
    if ratio < src_ratio and top > 0:  # bands above and below: the first and last rows stretched
        out.paste(resized.resize((width, top), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, top), box=(0, resized.height, width, resized.height)),
                  box=(0, top + src_h))
    elif ratio > src_ratio and left > 0:  # bands left and right: the first and last columns stretched
        out.paste(resized.resize((left, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((left, height), box=(resized.width, 0, resized.width, height)),
                  box=(left + src_w, 0))
    return out


def to_pixels(image: Image.Image) -> np.ndarray:
    """An RGB image as (3, H, W) float32 in [-1, 1], the VAE encoder's input."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return np.moveaxis(array, 2, 0) * np.float32(2.0) - np.float32(1.0)


def prepare_pixels(image: Image.Image, width: int, height: int, resize_mode: int) -> Image.Image:
    """The init image flattened and, except for the latent mode, resized to the job's size."""
    image = flatten(image)
    return image if resize_mode == LATENT_UPSCALE else resize_image(resize_mode, image, width, height)


def resize_latent(latents: np.ndarray, width: int, height: int) -> np.ndarray:
    """Mode 3: the encoded latents to the job's latent size (torch interpolate, bilinear, no antialias)."""
    size = (height // 8, width // 8)
    if latents.shape[-2:] == size:
        return latents
    return interpolate(latents, size=size, mode="bilinear", antialias=False).astype(np.float32)
