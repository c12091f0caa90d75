"""Test-only reference for A1111 1.10's img2img preparation, inpainting and overlay, in torch + Pillow + OpenCV.

What it states (the behaviour of A1111's processing.py / images.py / masking.py, restated here, not ported):

* init images are flattened onto white, then brought to the job size by one of four resize modes, every
  resize Lanczos (no img2img upscaler);
* the mask is read as grey or, for a partly transparent RGBA image, from its alpha (thresholded at 128
  when rounding), optionally inverted, then blurred by OpenCV's Gaussian along x and then along y;
* "Only masked" works on the mask's bounding box (padded, then grown to the job's aspect ratio), cropped
  out and resized into the job; "Whole picture" resizes the mask like the image;
* masked content "fill" paints the masked area from ever sharper blurs of the known pixels, "latent
  noise"/"latent nothing" replace the masked latent afterwards; the latent blend keeps the init latent
  where the (latent-size, optionally rounded) mask is black;
* inpainting models get a 5-channel conditioning (mask + latent of the masked-out image);
* the final 8-bit images get the original laid over everything outside the blurred mask.

The samplers are k-diffusion's and diffusers' DDIM step, driven as tests/reference.py does, so that the
engine's numpy code is checked against a separate statement of the same steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .reference import NoiseHijack, ReferencePipeline

# Pillow's default resampling filter for RGB/L images; A1111 leaves it implicit in these resizes.
PILLOW_DEFAULT_FILTER = Image.BICUBIC

# "fill": (Gaussian radius, how many times that blur is laid over the canvas), widest first.
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))

FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = 0, 1, 2, 3  # inpainting_fill values
STRETCH, CROP, PAD, LATENT_UPSCALE = 0, 1, 2, 3              # resize_mode values


# ---- resizing and flattening -------------------------------------------------------------------------

def _lanczos(image: Image.Image, size) -> Image.Image:
    return image.resize(size, resample=Image.LANCZOS)


def _scaled_size(image: Image.Image, width: int, height: int, cover: bool) -> tuple[int, int]:
    """The image scaled to the target's width or height (floor of the other side): the one that makes it
    cover the target (`cover`) or fit inside it. Target and image ratios compare exactly (cross-multiplied)."""
    target_wider = width * image.height > image.width * height
    target_narrower = width * image.height < image.width * height
    if target_wider if cover else target_narrower:
        return width, image.height * width // image.width
    return image.width * height // image.height, height


def _centred(image: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int]]:
    """A black RGB canvas of the target size with `image` pasted in its middle (offsets floored)."""
    canvas = Image.new("RGB", (width, height))
    at = (width // 2 - image.width // 2, height // 2 - image.height // 2)
    canvas.paste(image, at)
    return canvas, at


def _stretch_edges(canvas: Image.Image, image: Image.Image, at: tuple[int, int]) -> None:
    """Resize mode 2's bands: the image's outer row (or column) stretched over the empty margin on each
    side. Pillow resizes a zero-thickness box at the edge; both bands take the first margin's thickness."""
    x, y = at
    w, h = image.size
    if y > 0:
        canvas.paste(image.resize((w, y), PILLOW_DEFAULT_FILTER, box=(0, 0, w, 0)), (0, 0))
        canvas.paste(image.resize((w, y), PILLOW_DEFAULT_FILTER, box=(0, h, w, h)), (0, y + h))
    elif x > 0:
        canvas.paste(image.resize((x, h), PILLOW_DEFAULT_FILTER, box=(0, 0, 0, h)), (0, 0))
        canvas.paste(image.resize((x, h), PILLOW_DEFAULT_FILTER, box=(w, 0, w, h)), (x + w, 0))


def resize_image(resize_mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize modes: 0 stretch; 1 scale to cover and crop the overflow; 2 (and 3, whose latent
    upscale happens elsewhere) scale to fit and stretch the edges into the bands. RGBA loses its alpha;
    modes 1-3 return RGB whatever the input mode."""
    if im.mode == "RGBA":
        im = im.convert("RGB")
    if resize_mode == STRETCH:
        return _lanczos(im, (width, height))
    scaled = _lanczos(im, _scaled_size(im, width, height, cover=resize_mode == CROP))
    canvas, at = _centred(scaled, width, height)
    if resize_mode != CROP:
        _stretch_edges(canvas, scaled, at)
    return canvas


def flatten(img: Image.Image, bgcolor="#ffffff") -> Image.Image:
    """RGB of the image; transparency is composed onto `bgcolor` (Pillow paste with the alpha as mask)."""
    if img.mode != "RGBA":
        return img.convert("RGB")
    backdrop = Image.new("RGBA", img.size, bgcolor)
    backdrop.paste(img, (0, 0), img)
    return backdrop.convert("RGB")


# ---- the mask -----------------------------------------------------------------------------------------

def create_binary_mask(image: Image.Image, round: bool = True) -> Image.Image:
    """An "L" mask: a partly transparent RGBA image gives its alpha (255 above 128, else 0, when rounding);
    anything else its grey conversion."""
    if image.mode != "RGBA" or image.getchannel("A").getextrema() == (255, 255):
        return image.convert("L")
    alpha = np.asarray(image.getchannel("A"))
    if round:
        alpha = np.where(alpha > 128, 255, 0).astype(np.uint8)
    return Image.fromarray(alpha, "L")


def _blur_kernel(sigma: float) -> int:
    """OpenCV kernel length A1111 uses for a mask blur of `sigma`: 2 * round-half-up(2.5 σ) + 1."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def _blur_mask(mask: Image.Image, sigma_x: float, sigma_y: float) -> Image.Image:
    """cv2.GaussianBlur along x (kernel k×1), then along y (1×k), each only for a positive sigma."""
    import cv2

    pixels = np.asarray(mask)
    if sigma_x > 0:
        pixels = cv2.GaussianBlur(pixels, (_blur_kernel(sigma_x), 1), sigma_x)
    if sigma_y > 0:
        pixels = cv2.GaussianBlur(pixels, (1, _blur_kernel(sigma_y)), sigma_y)
    return Image.fromarray(pixels)


def get_crop_region_v2(mask: Image.Image, pad: int = 0):
    """Bounding box (x1, y1, x2 exclusive, y2 exclusive) of the mask's non-zero pixels, widened by `pad`
    on every side and clipped to the image; None for an empty mask."""
    rows, cols = np.nonzero(np.asarray(mask))
    if rows.size == 0:
        return None
    w, h = mask.size
    return (max(int(cols.min()) - pad, 0), max(int(rows.min()) - pad, 0),
            min(int(cols.max()) + 1 + pad, w), min(int(rows.max()) + 1 + pad, h))


def _grow_span(start: int, end: int, grow: int, limit: int) -> tuple[int, int]:
    """[start, end) widened by `grow` (the smaller half before), slid back inside [0, limit) when it
    sticks out past either end (the far end first), and cut at `limit` if it is still longer."""
    start, end = start - grow // 2, end + grow - grow // 2
    overshoot = max(end - limit, 0)
    start, end = start - overshoot, end - overshoot
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def expand_crop_region(crop_region, processing_width, processing_height, image_width, image_height):
    """The crop box grown along its short side to the job's aspect ratio. The wanted length is the long
    side divided (or multiplied) by the float ratio width/height, and the growth truncated to an int."""
    x1, y1, x2, y2 = crop_region
    job_ratio = processing_width / processing_height
    box_w, box_h = x2 - x1, y2 - y1
    if box_w / box_h > job_ratio:  # too wide: grow the height
        y1, y2 = _grow_span(y1, y2, int(box_w / job_ratio - box_h), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int(box_h * job_ratio - box_w), image_width)
    return x1, y1, x2, y2


# ---- pixels outside the mask: fill and overlay ----------------------------------------------------------

def _known_layer(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The pixels the mask leaves alone, as a premultiplied "RGBa" layer: the image pasted onto a clear
    canvas through the inverted grey mask (so alpha = 255 - mask)."""
    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), (0, 0), ImageOps.invert(mask.convert("L")))
    return layer


def masking_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": blur the known pixels (premultiplied, so holes do not darken them) at each
    radius of FILL_PASSES and stack the blurs, widest first, onto a clear canvas; the result's RGB."""
    known = _known_layer(image, mask)
    painted = Image.new("RGBA", image.size)
    for radius, times in FILL_PASSES:
        blur = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            painted = Image.alpha_composite(painted, blur)
    return painted.convert("RGB")


def _overlay_layer(image: Image.Image, overlay_mask: Image.Image) -> Image.Image:
    """The original outside the (blurred) mask, as straight RGBA (the premultiplied round trip included)."""
    return _known_layer(image, overlay_mask).convert("RGBA")


def apply_overlay(image: Image.Image, paste_box, overlay):
    """The generated image, first put back into the full picture for "Only masked" (cover-resized to the
    crop box, on a clear canvas), with the overlay composed on top."""
    if overlay is None:
        return image
    if paste_box is not None:
        x, y, w, h = paste_box
        canvas = Image.new("RGBA", overlay.size)
        canvas.paste(resize_image(CROP, image, w, h), (x, y))
        image = canvas
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


# ---- img2img preparation ------------------------------------------------------------------------------

@dataclass
class Img2ImgJob:
    """The img2img fields this reference reads, with A1111's defaults."""
    init_images: list | None = None
    resize_mode: int = STRETCH
    width: int = 64
    height: int = 64
    batch_size: int = 1
    mask: Image.Image | None = None
    mask_blur_x: float = 4
    mask_blur_y: float = 4
    mask_round: bool = True
    inpainting_fill: int = FILL
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    inpainting_mask_weight: float = 1.0
    latent_mask: Image.Image | None = None


def processing(**fields) -> Img2ImgJob:
    return Img2ImgJob(**fields)


@dataclass
class Prepared:
    """What sampling and the final images need: the init latent, the latent blend masks (`keep` 1 where
    the init latent stays, `repaint` its complement; None without a mask), the inpainting conditioning,
    one overlay per image and the "Only masked" paste box, and the infotext entries set on the way."""
    init_latent: torch.Tensor
    keep: torch.Tensor | None = None
    repaint: torch.Tensor | None = None
    image_conditioning: torch.Tensor | None = None
    overlays: list | None = None
    paste_box: tuple | None = None
    extra_generation_params: dict = field(default_factory=dict)


@dataclass
class _MaskPlan:
    """The mask at job size (None once "Only masked" finds nothing), the mask the overlay uses (full
    picture), and the crop box for "Only masked"."""
    job_mask: Image.Image | None
    overlay_mask: Image.Image | None
    crop: tuple | None = None


def _plan_mask(job: Img2ImgJob, notes: dict) -> _MaskPlan:
    mask = create_binary_mask(job.mask, round=job.mask_round)
    if job.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
        notes["Mask mode"] = "Inpaint not masked"
    mask = _blur_mask(mask, job.mask_blur_x, job.mask_blur_y)
    if job.mask_blur_x > 0 or job.mask_blur_y > 0:
        notes["Mask blur"] = job.mask_blur_x if job.mask_blur_x == job.mask_blur_y else None

    if not job.inpaint_full_res:
        job_mask = resize_image(job.resize_mode, mask, job.width, job.height).convert("L")
        # The overlay uses the mask doubled (saturating): the new pixels show fully wherever the blurred
        # mask is past half, and the original fades in only over the blur's outer half.
        doubled = np.clip(np.asarray(job_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        return _MaskPlan(job_mask, Image.fromarray(doubled, "L"))

    box = get_crop_region_v2(mask, job.inpaint_full_res_padding)
    if box is None:
        return _MaskPlan(None, None)
    box = expand_crop_region(box, job.width, job.height, mask.width, mask.height)
    notes["Inpaint area"] = "Only masked"
    notes["Masked area padding"] = job.inpaint_full_res_padding
    return _MaskPlan(resize_image(PAD, mask.crop(box), job.width, job.height), mask, box)


def _latent_blend_masks(mask: Image.Image, latent_shape, rounded: bool):
    """(keep, repaint) at latent size: the mask's red channel, bicubic-resized, /255, rounded if asked,
    the same for every latent channel."""
    _, channels, h, w = latent_shape
    red = np.asarray(mask.convert("RGB").resize((w, h), PILLOW_DEFAULT_FILTER))[..., 0].astype(np.float32) / 255
    if rounded:
        red = np.round(red)
    repaint = torch.from_numpy(np.repeat(red[None], channels, axis=0))
    return 1.0 - repaint, repaint


def img2img_init(p: Img2ImgJob, reference: "InpaintReference", all_seeds, inpainting_model: bool,
                 noise_source="GPU") -> Prepared:
    """The init latent, masks, overlays and conditioning A1111 prepares for an img2img job."""
    from sdfc.engine.rng import ImageRNG

    notes: dict = {}
    plan = _plan_mask(p, notes) if p.mask is not None else _MaskPlan(None, None)
    masked = plan.job_mask is not None
    fill_mask = p.latent_mask if p.latent_mask is not None else plan.job_mask
    overlays = [] if p.mask is not None else None  # set even when "Only masked" found nothing
    overlay_mask = plan.overlay_mask

    pixels = []
    for source in p.init_images:
        image = flatten(source)
        if plan.crop is None and p.resize_mode != LATENT_UPSCALE:
            image = resize_image(p.resize_mode, image, p.width, p.height)
        if masked:
            if overlay_mask.size != image.size:
                overlay_mask = resize_image(p.resize_mode, overlay_mask, image.width, image.height)
            overlays.append(_overlay_layer(image, overlay_mask))
        if plan.crop is not None:
            image = resize_image(PAD, image.crop(plan.crop), p.width, p.height)
        if masked and p.inpainting_fill != ORIGINAL:  # the latent options are filled too, then replaced
            image = masking_fill(image, fill_mask)
            if p.inpainting_fill == FILL:
                notes["Masked content"] = "fill"
        pixels.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)

    if len(pixels) == 1:  # one init image serves the whole batch
        pixels *= p.batch_size
        overlays = None if overlays is None else overlays * p.batch_size
    batch = torch.from_numpy(np.stack(pixels))
    latent = torch.cat([reference.encode_image((one[None] * 2 - 1).numpy()) for one in batch])
    if p.resize_mode == LATENT_UPSCALE:
        latent = torch.nn.functional.interpolate(latent, size=(p.height // 8, p.width // 8), mode="bilinear")

    prepared = Prepared(latent, overlays=overlays, extra_generation_params=notes,
                        paste_box=None if plan.crop is None else
                        (plan.crop[0], plan.crop[1], plan.crop[2] - plan.crop[0], plan.crop[3] - plan.crop[1]))
    if masked:
        keep, repaint = _latent_blend_masks(fill_mask, latent.shape, p.mask_round)
        prepared.keep, prepared.repaint = keep, repaint
        if p.inpainting_fill == LATENT_NOISE:
            noise = ImageRNG(tuple(latent.shape[1:]), all_seeds[:latent.shape[0]], source=noise_source).first()
            prepared.init_latent = latent * keep + torch.from_numpy(noise) * repaint
            notes["Masked content"] = "latent noise"
        elif p.inpainting_fill == LATENT_NOTHING:
            prepared.init_latent = latent * keep
            notes["Masked content"] = "latent nothing"
    if inpainting_model:
        prepared.image_conditioning = _inpaint_conditioning(reference, batch * 2 - 1, prepared.init_latent,
                                                            plan.job_mask, p.mask_round, p.inpainting_mask_weight)
    return prepared


def _inpaint_conditioning(reference, pixels, latent, mask, rounded, weight):
    """The inpainting UNet's extra channels: the job mask at latent size (nearest; all ones without a
    mask), then the latent of the image with the masked area blacked out by `weight` (torch.lerp)."""
    if mask is None:
        cond_mask = torch.ones(1, 1, *pixels.shape[-2:])
    else:
        cond_mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
        if rounded:
            cond_mask = torch.round(cond_mask)
    masked_out = torch.lerp(pixels, pixels * (1.0 - cond_mask), weight)
    cond_latent = torch.cat([reference.encode_image(one[None].numpy()) for one in masked_out])
    small_mask = torch.nn.functional.interpolate(cond_mask, size=latent.shape[-2:])
    return torch.cat([small_mask.expand(cond_latent.shape[0], -1, -1, -1), cond_latent], dim=1)


@torch.no_grad()
def txt2img_image_conditioning(reference, batch, width, height):
    """An inpainting model's txt2img conditioning: everything masked (ones) over the latent of mid-grey."""
    grey = torch.zeros(batch, 3, height, width)  # 0.5 in [0, 1] is 0 in [-1, 1]
    latent = reference.encode_image(grey.numpy())
    return torch.cat([torch.ones(batch, 1, *latent.shape[-2:]), latent], dim=1)


# ---- sampling with the latent blend -------------------------------------------------------------------

def _keep_init(prepared: Prepared, x: torch.Tensor) -> torch.Tensor:
    """x where the mask repaints, the init latent elsewhere (no-op without a mask)."""
    if prepared.keep is None:
        return x
    return x * prepared.repaint + prepared.init_latent * prepared.keep


class InpaintReference(ReferencePipeline):
    """ReferencePipeline whose UNet also takes `self.c_concat` (when set) as extra input channels, appended
    after k-diffusion's input scaling, as an inpainting model's conditioning is."""

    def __init__(self, diffusers_dir: Path):
        super().__init__(diffusers_dir)
        self.c_concat = None
        pipeline = self

        class EpsWithConcat(torch.nn.Module):
            def forward(self, x, t, cond):
                if pipeline.c_concat is not None:
                    x = torch.cat([x, pipeline.c_concat], dim=1)
                return pipeline.unet(x, t, encoder_hidden_states=cond).sample

        self.denoiser = self.external.DiscreteEpsDDPMDenoiser(EpsWithConcat(), self.alphas_cumprod, quantize=False)

    def _with_concat(self, conditioning):
        """Conditioning for the cond+uncond batch (the same for both halves)."""
        self.c_concat = None if conditioning is None else torch.cat([conditioning, conditioning])

    @torch.no_grad()
    def k_inpaint(self, p, function, prompt, negative, noise_first, next_noise, steps, cfg, schedule, t_enc,
                  noise_multiplier=1.0):
        """A k-diffusion img2img run: the last t_enc + 1 sigmas, the init latent plus scaled noise, the
        guided denoised output blended with the init latent at every call, and the result once more."""
        n = noise_first.shape[0]
        cond, uncond = self.encode([prompt] * n), self.encode([negative] * n)
        sigmas = self.sigmas(steps, schedule)[steps - t_enc - 1:]
        noise = torch.from_numpy(noise_first)
        if noise_multiplier != 1.0:
            noise = noise * noise_multiplier
        guided = self.cfg_model(cond, uncond, cfg)
        real_torch = self.sampling.torch
        self.sampling.torch = NoiseHijack(next_noise)
        self._with_concat(p.image_conditioning)
        try:
            sample = getattr(self.sampling, f"sample_{function}")
            latents = sample(lambda x, sigma: _keep_init(p, guided(x, sigma)), p.init_latent + noise * sigmas[0],
                             sigmas, disable=True)
        finally:
            self.sampling.torch = real_torch
            self.c_concat = None
        return _keep_init(p, latents)

    @torch.no_grad()
    def ddim_inpaint(self, p, prompt, negative, noise_first, steps, cfg, t_enc):
        """DDIM (η = 0) img2img: start at grid timestep t_enc, blend the UNet's input (not its output) with
        the init latent before each step, skip the last grid timestep, blend the result once more."""
        n = noise_first.shape[0]
        cond, uncond = self.encode([prompt] * n), self.encode([negative] * n)
        self.ddim.set_timesteps(steps)
        start = sorted(int(t) for t in self.ddim.timesteps)[t_enc]
        alpha = self.alphas_cumprod[start]
        x = p.init_latent * alpha.sqrt() + torch.from_numpy(noise_first) * (1 - alpha).sqrt()
        walk = [t for t in self.ddim.timesteps if int(t) < start][:-1]
        extra = None if p.image_conditioning is None else torch.cat([p.image_conditioning] * 2)
        texts = torch.cat([cond, uncond])
        for t in walk:
            unet_in = torch.cat([_keep_init(p, x)] * 2)
            if extra is not None:
                unet_in = torch.cat([unet_in, extra], dim=1)
            eps_c, eps_u = self.unet(unet_in, t.float(), encoder_hidden_states=texts).sample.chunk(2)
            x = self.ddim.step(eps_u + (eps_c - eps_u) * cfg, t, x, eta=0.0).prev_sample
        return _keep_init(p, x)

    @torch.no_grad()
    def k_txt2img(self, function, prompt, negative, noise_first, next_noise, steps, cfg, schedule, image_cond):
        self._with_concat(image_cond)
        try:
            return self.k_sample(function, prompt, negative, noise_first, next_noise, steps, cfg, schedule)
        finally:
            self.c_concat = None


def finish_images(decoded, p: Prepared):
    """The saved images: decoded floats to 8 bits (truncated), then the overlay of the original."""
    images = []
    for i, pixels in enumerate(decoded):
        image = Image.fromarray((255.0 * pixels).astype(np.uint8))
        overlay = p.overlays[i] if p.overlays is not None and i < len(p.overlays) else None
        images.append(apply_overlay(image, p.paste_box, overlay))
    return images
