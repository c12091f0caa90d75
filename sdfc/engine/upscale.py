"""Upscaling: torch's `interpolate` for latents (in numpy) and the weight-free pixel upscalers.

One table each, as A1111 names them: `LATENT_UPSCALE_MODES` is what `/sdapi/v1/latent-upscale-modes`
lists (A1111's `shared.latent_upscale_modes`), `PIXEL_UPSCALERS` what `/sdapi/v1/upscalers` lists. The
model-based upscalers (ESRGAN, SwinIR, ...) need weights sdfc does not have, so they are not offered.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class LatentUpscaleMode:
    mode: str
    antialias: bool = False


# A1111 modules/shared.py latent_upscale_modes: name -> torch interpolate(mode=, antialias=).
LATENT_UPSCALE_MODES: dict[str, LatentUpscaleMode] = {
    "Latent": LatentUpscaleMode("bilinear"),
    "Latent (antialiased)": LatentUpscaleMode("bilinear", True),
    "Latent (bicubic)": LatentUpscaleMode("bicubic"),
    "Latent (bicubic antialiased)": LatentUpscaleMode("bicubic", True),
    "Latent (nearest)": LatentUpscaleMode("nearest"),
    "Latent (nearest-exact)": LatentUpscaleMode("nearest-exact"),
}
DEFAULT_LATENT_UPSCALE_MODE = "Latent"  # A1111's latent_upscale_default_mode

# The pixel upscalers that need no weights, in A1111's order; the value is PIL's resampling filter
# (None: "None" keeps the image as it is, the final resize to the exact size is Lanczos anyway).
PIXEL_UPSCALERS: dict[str, int | None] = {"None": None, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


def is_latent_upscaler(name: str) -> bool:
    return name in LATENT_UPSCALE_MODES


# ---------------------------------------------------------------------------------------------------
# torch.nn.functional.interpolate(x, size=(H, W), mode=..., align_corners=False, antialias=...) in numpy.
# Each mode is separable: a (out, in) weight matrix per axis, applied to H then W.

_CUBIC_A = -0.75  # torch's bicubic (align_corners=False); its antialiased bicubic uses PIL's -0.5
_CUBIC_A_ANTIALIAS = -0.5


def _nearest_matrix(n_in: int, n_out: int, exact: bool) -> np.ndarray:
    # torch computes the scale and index in float32: floor(dst * scale), or floor((dst + .5) * scale).
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32) + (np.float32(0.5) if exact else np.float32(0))
    src = np.minimum(np.floor(dst * scale).astype(np.int64), n_in - 1)
    if n_in == n_out:
        src = np.arange(n_out)
    m = np.zeros((n_out, n_in), np.float64)
    m[np.arange(n_out), src] = 1.0
    return m


def _source_coords(n_in: int, n_out: int) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    return (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    src = np.maximum(_source_coords(n_in, n_out), np.float32(0))  # torch clamps negatives for linear
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    src = _source_coords(n_in, n_out)  # no clamp for cubic: the taps are clamped instead
    i0 = np.floor(src).astype(np.int64)
    frac = (src - i0).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    for k in range(-1, 3):
        np.add.at(m, (rows, np.clip(i0 + k, 0, n_in - 1)), _cubic(frac - k, _CUBIC_A))
    return m


def _antialias_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    # torch's antialiased path (PIL's resampling): the filter widens by the scale when shrinking,
    # taps outside the image are dropped and the weights renormalised.
    scale = n_in / n_out
    if mode == "bilinear":
        support, filt = 1.0, (lambda x: np.maximum(0.0, 1.0 - np.abs(x)))
    else:
        support, filt = 2.0, (lambda x: _cubic(x, _CUBIC_A_ANTIALIAS))
    support *= max(scale, 1.0)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = filt((j - center + 0.5) * inv)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


def _axis_matrix(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    if mode in ("nearest", "nearest-exact"):
        if antialias:
            raise ValueError(f"antialias is not available for mode {mode!r}")
        return _nearest_matrix(n_in, n_out, exact=mode == "nearest-exact")
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"unknown interpolation mode {mode!r}")
    if antialias:
        return _antialias_matrix(n_in, n_out, mode)
    return _linear_matrix(n_in, n_out) if mode == "bilinear" else _cubic_matrix(n_in, n_out)


def interpolate(latents: np.ndarray, size: tuple[int, int], mode: str, antialias: bool = False) -> np.ndarray:
    """torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias) for (N, C, H, W)."""
    if latents.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) array, got shape {latents.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {size}")
    _, _, in_h, in_w = latents.shape
    rows = _axis_matrix(in_h, out_h, mode, antialias)
    cols = _axis_matrix(in_w, out_w, mode, antialias)
    out = np.einsum("oh,nchw,pw->ncop", rows, latents.astype(np.float64, copy=False), cols, optimize=True)
    return out.astype(latents.dtype if latents.dtype.kind == "f" else np.float32)


def upscale_latents(latents: np.ndarray, size: tuple[int, int], upscaler: str) -> np.ndarray:
    """A1111's latent upscale by mode name (`size` is the latent (H, W))."""
    mode = LATENT_UPSCALE_MODES[upscaler]
    return interpolate(latents, size, mode.mode, mode.antialias)


# ---------------------------------------------------------------------------------------------------
# Pixel upscalers, as A1111's images.resize_image(0, ...) with a named upscaler runs them.

def _upscaler_pass(image: Image.Image, scale: float, resample: int | None) -> Image.Image:
    # A1111 Upscaler.upscale: aim at the scaled size floored to a multiple of 8, up to 3 model passes,
    # then Lanczos to that size.
    dest_w = int((image.width * scale) // 8 * 8)
    dest_h = int((image.height * scale) // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = image.size
        if resample is not None:
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if shape == image.size:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=Image.LANCZOS)
    return image


def upscale_image(image: Image.Image, width: int, height: int, upscaler: str) -> Image.Image:
    """Resize `image` to exactly width x height with a named pixel upscaler (A1111 resize mode 0)."""
    if upscaler not in PIXEL_UPSCALERS:
        raise ValueError(f"could not find upscaler named {upscaler!r}")
    if upscaler == "None" or image.mode == "L":
        return image.resize((width, height), resample=Image.LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = _upscaler_pass(image, scale, PIXEL_UPSCALERS[upscaler])
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return image


__all__ = ["LATENT_UPSCALE_MODES", "DEFAULT_LATENT_UPSCALE_MODE", "PIXEL_UPSCALERS", "LatentUpscaleMode",
           "interpolate", "upscale_latents", "upscale_image", "is_latent_upscaler"]
