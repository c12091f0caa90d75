"""Inpainting as A1111 1.10 does it (processing.py StableDiffusionProcessingImg2Img.init/sample, masking.py,
sd_samplers_cfg_denoiser.py), for ordinary models and for 9-channel inpainting UNets.

The mask, in order: made binary (an RGBA mask's alpha, else its grey; `mask_round` thresholds the alpha
at 128), inverted (`inpainting_mask_invert`), blurred (`mask_blur_x`, `mask_blur_y`: OpenCV's 8-bit
GaussianBlur, reproduced bit for bit below), then either
  * cropped ("Only masked", `inpaint_full_res`): the masked area's bounding box plus `inpaint_full_res_padding`,
    widened to the job's aspect ratio, is what gets generated at width x height and pasted back, or
  * resized like the init image (`resize_mode`).
White (255) is repainted. In latent space the mask is the processing mask resized to the latent size
(Pillow's default filter) and, with `mask_round`, rounded to 0/1. A request's `latent_mask` (A1111's
p.latent_mask, which its outpainting scripts draw) replaces the processing mask, as sent, for the latent
mask and the masked-content fill; the processing mask keeps the overlay and the inpainting UNet's input.

During sampling the known area is held to the init latent: k-diffusion samplers blend the *denoised*
prediction (`denoised * nmask + init * mask`), the DDIM family blends the sampler's x before each UNet call
(A1111's `mask_before_denoising`), and the final latent is blended once more. An inpainting UNet also gets
its image conditioning (mask + VAE latent of the masked image) as 5 extra input channels. After decoding,
the original image is laid over everything outside the (blurred) mask.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import InvalidRequestError
from .init_image import LATENT_UPSCALE, flatten, resize_image, resize_latent, to_pixels
from .rng import ImageRNG
from .upscale import interpolate

log = logging.getLogger("sdfc.engine")

FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = range(4)  # inpainting_fill, as A1111 numbers them
MASKED_CONTENT = {FILL: "fill", ORIGINAL: "original", LATENT_NOISE: "latent noise", LATENT_NOTHING: "latent nothing"}
MAX_MASK_BLUR = 64  # A1111's slider maximum; larger blurs only cost time (the kernel grows as 5 sigma)
MAX_ENGINE_MASK_BLUR = 4 * MAX_MASK_BLUR  # what the engine takes: Outpainting mk2 blurs by 4x its slider
INPAINT_UNET_CHANNELS = 9  # latent (4) + mask (1) + masked-image latent (4)


@dataclass
class InpaintOptions:
    """The request's inpainting fields (A1111's StableDiffusionProcessingImg2Img defaults)."""

    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = FILL
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: bool = False
    mask_weight: float = 1.0  # option inpainting_mask_weight: how much of the masked image an inpainting UNet sees


def validate(opts: InpaintOptions) -> None:
    for name in ("mask_blur_x", "mask_blur_y"):
        value = getattr(opts, name)
        if not _is_int(value) or not 0 <= value <= MAX_ENGINE_MASK_BLUR:
            raise InvalidRequestError(f"{name} must be an integer from 0 to {MAX_ENGINE_MASK_BLUR}, got {value!r}")
    if not _is_int(opts.inpainting_fill) or opts.inpainting_fill not in MASKED_CONTENT:
        raise InvalidRequestError(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or "
                                  f"3 (latent nothing), got {opts.inpainting_fill!r}")
    if not _is_int(opts.inpaint_full_res_padding) or opts.inpaint_full_res_padding < 0:
        raise InvalidRequestError(f"inpaint_full_res_padding must be an integer of at least 0, "
                                  f"got {opts.inpaint_full_res_padding!r}")
    if not isinstance(opts.mask_weight, (int, float)) or not 0 <= opts.mask_weight <= 1:
        raise InvalidRequestError(f"inpainting_mask_weight must be between 0 and 1, got {opts.mask_weight!r}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------
# The mask in pixels

def binary_mask(image: Image.Image, round_alpha: bool = True) -> Image.Image:
    """Mode L: an RGBA mask's alpha (thresholded above 128 when `round_alpha`), any other mask's grey."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
    return image.convert("L")


def blur_kernel(sigma: float, bits: int = 8) -> np.ndarray:
    """OpenCV's bit-exact 8-bit Gaussian kernel of A1111's size 2·int(2.5σ + 0.5) + 1: the sampled Gaussian
    normalised in double precision, then quantised to `bits` fraction bits with the rounding error carried
    from tap to tap (error diffusion); the centre tap takes what is left of 1.0. Integers summing to 2**bits."""
    n = 2 * int(2.5 * sigma + 0.5) + 1
    half = n // 2
    scale = -0.125 / (float(sigma) * float(sigma))  # exp(-(x/2)²/2σ²) at x = 1-n, 3-n, ... (odd offsets)
    values = [float(np.exp(float(x * x) * scale)) for x in range(1 - n, 0, 2)]
    inverse = 1.0 / (sum(values) * 2.0 + 1.0)
    taps = np.zeros(n, np.int64)
    error, side = 0.0, 0
    for i, value in enumerate(values):
        wanted = value * inverse * float(1 << bits) + error
        taps[i] = taps[n - 1 - i] = int(np.rint(wanted))
        error = wanted - float(taps[i])
        side += int(taps[i])
    taps[half] = (1 << bits) - 2 * side
    return taps


def _reflect101(count: int, size: int) -> np.ndarray:
    """Indices of `size` samples padded by `count` on each side: OpenCV's BORDER_REFLECT_101 (dcb|abcd|cba)."""
    index = np.arange(-count, size + count)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def _blur_axis(mask: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    taps = blur_kernel(sigma)
    radius = len(taps) // 2
    size = mask.shape[axis]
    # uint16 is exact: the taps sum to 256, so no sum exceeds 255 * 256 (+ 128 for the rounding).
    padded = np.take(mask, _reflect101(radius, size), axis=axis).astype(np.uint16)
    total = np.zeros(mask.shape, np.uint16)
    for i, tap in enumerate(taps):
        if tap:
            total += np.uint16(tap) * (padded[:, i:i + size] if axis == 1 else padded[i:i + size, :])
    return ((total + np.uint16(128)) >> np.uint16(8)).astype(np.uint8)  # 8 fraction bits, rounded half up


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's two passes: cv2.GaussianBlur(mask, (k, 1), blur_x), then (1, k) with blur_y."""
    array = np.asarray(mask.convert("L"))
    if blur_x > 0:
        array = _blur_axis(array, blur_x, axis=1)
    if blur_y > 0:
        array = _blur_axis(array, blur_y, axis=0)
    return Image.fromarray(array) if (blur_x > 0 or blur_y > 0) else mask


def crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """The bounding box of the non-black pixels, grown by `pad` within the image; None for a black mask."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    if not pad:
        return box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(region, width: int, height: int, image_width: int, image_height: int):
    """Grow the region's shorter side (centred, shifted back inside the image) to the job's aspect ratio."""
    x1, y1, x2, y2 = region
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / target - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * target - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """"fill": the masked area painted with ever less blurred copies of the unmasked image (A1111 masking.fill)."""
    canvas = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            canvas.alpha_composite(blurred)
    return canvas.convert("RGB")


def make_overlay(image: Image.Image, overlay_mask: Image.Image) -> Image.Image:
    """The original as RGBA, transparent where the overlay mask is white (through A1111's premultiplied paste)."""
    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    return layer.convert("RGBA")


def apply_overlay(image: Image.Image, paste_to, overlay: Image.Image | None) -> Image.Image:
    """The generated image (pasted back into the full canvas after "Only masked") under the overlay."""
    if overlay is None:
        return image
    if paste_to is not None:
        x, y, w, h = paste_to
        canvas = Image.new("RGBA", overlay.size)
        canvas.paste(resize_image(1, image, w, h), (x, y))
        image = canvas
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Latent space

@dataclass
class LatentBlend:
    """Holds the known area to the init latent: mask is 1 where the original stays, nmask where it is repainted."""

    init_latent: np.ndarray  # (B, 4, h, w)
    mask: np.ndarray         # (4, h, w)
    nmask: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x * self.nmask + self.init_latent * self.mask

    def after(self, denoiser):
        """k-diffusion: the denoised prediction is blended (A1111's default, mask_before_denoising off)."""
        return lambda x, sigma, *args, **kw: self(denoiser(x, sigma, *args, **kw))

    def before(self, eps_model):
        """DDIM family (mask_before_denoising on): the UNet sees the blended x; the sampler keeps its own."""
        return lambda x, t, *args: eps_model(self(x), t, *args)


def latent_masks(mask: Image.Image, latent_hw: tuple[int, int], round_mask: bool, channels: int = 4):
    """(mask, nmask) at latent size, as A1111: the RGB mask resized by Pillow's default filter, channel 0."""
    h, w = latent_hw
    small = np.asarray(mask.convert("RGB").resize((w, h)), dtype=np.float32)[:, :, 0] / np.float32(255)
    if round_mask:
        small = np.around(small)
    nmask = np.tile(small[None], (channels, 1, 1)).astype(np.float32)
    return (np.float32(1.0) - nmask).astype(np.float32), nmask


def _lerp(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    # torch.lerp's two-sided formula (exact at both ends).
    w = np.float32(weight)
    return a + w * (b - a) if abs(weight) < 0.5 else b - (b - a) * (np.float32(1) - w)


def image_conditioning(encode, pixels: np.ndarray, mask: Image.Image | None, latent_hw, round_mask: bool,
                       weight: float) -> np.ndarray:
    """An inpainting UNet's extra channels: [mask at latent size (nearest), latent of the masked image]."""
    if mask is not None:
        cmask = np.asarray(mask.convert("L")).astype(np.float32)[None, None] / np.float32(255.0)
        if round_mask:
            cmask = np.round(cmask)
    else:
        cmask = np.ones((1, 1, *pixels.shape[-2:]), np.float32)
    masked = _lerp(pixels, pixels * (np.float32(1.0) - cmask), weight)
    latent = np.concatenate([encode(m[None]) for m in masked])
    small = interpolate(cmask, size=tuple(latent_hw), mode="nearest").astype(np.float32)
    return np.concatenate([np.broadcast_to(small, (len(latent), 1, *latent_hw)), latent], axis=1)


def txt2img_conditioning(encode, batch: int, width: int, height: int) -> np.ndarray:
    """txt2img on an inpainting UNet: everything masked, the "masked image" all grey (0 in [-1, 1])."""
    latent = encode(np.zeros((1, 3, height, width), np.float32))
    ones = np.ones((1, 1, *latent.shape[-2:]), np.float32)
    return np.repeat(np.concatenate([ones, latent], axis=1), batch, axis=0)


# ---------------------------------------------------------------------------------------------------
# img2img's init, with or without a mask

@dataclass
class Img2ImgInit:
    init_latent: np.ndarray            # (batch_size, 4, h, w), after the masked-content fill
    blend: LatentBlend | None = None   # None without a mask
    image_cond: np.ndarray | None = None  # (batch_size, 5, h, w) for an inpainting UNet
    overlays: list[Image.Image] | None = None  # per batch row: the original outside the mask (RGBA)
    paste_to: tuple[int, int, int, int] | None = None  # "Only masked": where the result goes back (x, y, w, h)
    infotext: dict = field(default_factory=dict)

    def finish(self, image: Image.Image, row: int) -> Image.Image:
        if self.overlays is None:
            return image
        return apply_overlay(image, self.paste_to, self.overlays[row % len(self.overlays)])


def _processing_mask(req, infotext: dict):
    """(mask at width x height, mask for the overlay, crop region) of a request; all None without a mask."""
    opts: InpaintOptions = req.inpaint
    mask = binary_mask(req.mask, opts.mask_round)
    if opts.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
        infotext["Mask mode"] = "Inpaint not masked"
    mask = blur_mask(mask, opts.mask_blur_x, opts.mask_blur_y)
    if opts.mask_blur_x > 0 or opts.mask_blur_y > 0:
        # A1111 reads its mask_blur property: the blur only when x and y agree, else nothing is written.
        infotext["Mask blur"] = opts.mask_blur_x if opts.mask_blur_x == opts.mask_blur_y else None
    if not opts.inpaint_full_res:
        mask = resize_image(req.resize_mode, mask, req.width, req.height)
        doubled = np.clip(np.asarray(mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        return mask, Image.fromarray(doubled), None
    region = crop_region(mask, opts.inpaint_full_res_padding)
    if region is None:
        log.info('Unable to perform "Inpaint Only mask" because mask is blank, switch to img2img mode.')
        return None, None, None
    region = expand_crop_region(region, req.width, req.height, mask.width, mask.height)
    infotext["Inpaint area"] = "Only masked"
    infotext["Masked area padding"] = opts.inpaint_full_res_padding
    return resize_image(2, mask.crop(region), req.width, req.height), mask, region


def prepare(req, encode, unet_channels: int, seeds: list[int]) -> Img2ImgInit:
    """A1111's img2img init for `req` (a GenerationRequest): init latents, masks, conditioning, overlays.

    `encode` maps (1, 3, H, W) pixels in [-1, 1] to latents; `seeds` are the first batch's image seeds (the
    "latent noise" fill draws from them once, for every batch, as A1111 does)."""
    infotext: dict = {}
    mask = overlay_mask = region = None
    if req.mask is not None:
        mask, overlay_mask, region = _processing_mask(req, infotext)
    # A1111's p.latent_mask (the outpainting scripts set one) replaces the processed mask, as sent (neither
    # binarised, blurred nor resized), for the masked-content fill and the latent blend; the processed
    # mask still drives the overlay and an inpainting UNet's conditioning. Without a mask it is unused.
    latent_mask = mask if mask is None or req.latent_mask is None else req.latent_mask
    opts: InpaintOptions = req.inpaint
    images, overlays = [], [] if mask is not None else None
    for source in req.init_images:
        image = flatten(source)
        if region is None and req.resize_mode != LATENT_UPSCALE:
            image = resize_image(req.resize_mode, image, req.width, req.height)
        if mask is not None:
            if overlay_mask.size != image.size:
                overlay_mask = resize_image(req.resize_mode, overlay_mask, image.width, image.height)
            if region is None and image.size != (req.width, req.height):
                # A1111 fails here too (its overlay cannot be composited over a differently sized result).
                raise InvalidRequestError(
                    f"resize_mode 3 with a mask needs init images of the job's size {req.width}x{req.height}, "
                    f"got {image.width}x{image.height}; use another resize_mode or inpaint_full_res")
            overlays.append(make_overlay(image, overlay_mask))
        if region is not None:
            image = resize_image(2, image.crop(region), req.width, req.height)
        if mask is not None and opts.inpainting_fill != ORIGINAL:
            if latent_mask.size != image.size:  # A1111 fails here too (Pillow pastes through a same-size mask)
                raise InvalidRequestError(f"latent_mask is {latent_mask.width}x{latent_mask.height}, but the "
                                          f"masked-content fill needs the image's size {image.width}x{image.height}")
            image = fill(image, latent_mask)
            if opts.inpainting_fill == FILL:
                infotext["Masked content"] = MASKED_CONTENT[FILL]
        images.append(to_pixels(image))
    # As A1111: the init images repeat over the batch when fewer than batch_size were sent.
    rows = [i % len(images) for i in range(req.batch_size)]
    latents = [encode(pixels[None]) for pixels in images]
    if req.resize_mode == LATENT_UPSCALE:
        latents = [resize_latent(latent, req.width, req.height) for latent in latents]
    init_latent = np.concatenate([latents[i] for i in rows])
    result = Img2ImgInit(init_latent=init_latent, overlays=None if overlays is None else [overlays[i] for i in rows],
                         paste_to=None if region is None else (region[0], region[1], region[2] - region[0],
                                                               region[3] - region[1]),
                         infotext=infotext)
    if mask is not None:
        keep, nmask = latent_masks(latent_mask, init_latent.shape[-2:], opts.mask_round, init_latent.shape[1])
        if opts.inpainting_fill == LATENT_NOISE:
            noise = ImageRNG(init_latent.shape[1:], seeds[:len(init_latent)], source=req.noise_source).first()
            init_latent = init_latent * keep + noise * nmask
            infotext["Masked content"] = MASKED_CONTENT[LATENT_NOISE]
        elif opts.inpainting_fill == LATENT_NOTHING:
            init_latent = init_latent * keep
            infotext["Masked content"] = MASKED_CONTENT[LATENT_NOTHING]
        result.init_latent = init_latent
        result.blend = LatentBlend(init_latent, keep, nmask)
    if req.initial_noise_multiplier != 1.0:  # A1111 notes it in sample(), after init's entries
        infotext["Noise multiplier"] = req.initial_noise_multiplier
    if unet_channels == INPAINT_UNET_CHANNELS:
        if any(p.shape[-2:] != (req.height, req.width) for p in images):
            # A1111 fails here too: the latent mode encodes at the images' own size, the mask is the job's.
            raise InvalidRequestError(f"resize_mode 3 (latent upscale) on an inpainting model needs init images "
                                      f"of the job's size {req.width}x{req.height}; use another resize_mode")
        pixels = np.stack([images[i] for i in rows])
        result.image_cond = image_conditioning(encode, pixels, mask, init_latent.shape[-2:], opts.mask_round,
                                               opts.mask_weight)
    return result
