"""A torch reference of A1111 1.10's hires fix, written from its processing.py / images.py (test-only).

First pass: k-diffusion's sampler on diffusers' UNet (tests/reference.py). Upscale: torch's `interpolate`
for the latent modes; for the pixel upscalers A1111's chain — decode, clamp, ×255 truncated to uint8,
`images.resize_image(0, ...)` with the named upscaler (Upscaler.upscale: aim at the scaled size floored to
a multiple of 8, PIL passes, then Lanczos to the exact size), /255, VAE encode (posterior mean). Then the
crop of `truncate_x/y`, a new ImageRNG at the new latent shape, and `sample_img2img` with an explicit step
count: schedule for int(steps / min(ds, 0.999)) steps, start at index len - 1 - steps, `steps` steps.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sdfc.engine.rng import ImageRNG

from .reference import NoiseHijack, ReferencePipeline

LATENT_MODES = {  # A1111 shared.latent_upscale_modes
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
PIL_FILTERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


def a1111_resize_image(image: Image.Image, width: int, height: int, upscaler: str) -> Image.Image:
    """images.resize_image(resize_mode=0, ...) for the weight-free upscalers."""
    if upscaler == "None":
        return image.resize((width, height), resample=Image.LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
        for i in range(3):
            if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
                break
            before = image.size
            image = image.resize((int(image.width * scale), int(image.height * scale)), PIL_FILTERS[upscaler])
            if before == image.size:
                break
        if image.size != (dest_w, dest_h):
            image = image.resize((dest_w, dest_h), resample=Image.LANCZOS)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return image


def target(width, height, scale, resize_x, resize_y):
    """calculate_target_resolution → (upscale_to_x, upscale_to_y, truncate_x, truncate_y)."""
    if resize_x == 0 and resize_y == 0:
        return int(width * scale), int(height * scale), 0, 0
    if resize_y == 0:
        return resize_x, resize_x * height // width, 0, 0
    if resize_x == 0:
        return resize_y * width // height, resize_y, 0, 0
    if width / height < resize_x / resize_y:
        to_x, to_y = resize_x, resize_x * height // width
    else:
        to_x, to_y = resize_y * width // height, resize_y
    return to_x, to_y, (to_x - resize_x) // 8, (to_y - resize_y) // 8


class HiresReference:
    def __init__(self, ref: ReferencePipeline):
        self.ref = ref

    @torch.no_grad()
    def _sample(self, function, prompt, negative, rng, steps, cfg, schedule, init_latent=None,
                requested_steps=None):
        """k-diffusion `sample_<function>`; returns latents. With `init_latent`: A1111's fixed-steps img2img."""
        b = len(rng.seeds)
        cond, uncond = self.ref.encode([prompt] * b), self.ref.encode([negative] * b)
        sigmas = self.ref.sigmas(steps, schedule)
        x = torch.from_numpy(rng.first())
        if init_latent is None:
            x = x * sigmas[0]
        else:
            t_enc = requested_steps - 1
            sigmas = sigmas[steps - t_enc - 1:]
            x = init_latent + x * sigmas[0]
        real = self.ref.sampling.torch
        self.ref.sampling.torch = NoiseHijack(rng.next)
        try:
            fn = getattr(self.ref.sampling, f"sample_{function}")
            return fn(self.ref.cfg_model(cond, uncond, cfg), x, sigmas, disable=True)
        finally:
            self.ref.sampling.torch = real

    @torch.no_grad()
    def run(self, *, seeds, prompt, negative, width, height, steps, cfg, function, schedule,
            upscaler, scale=2.0, resize_x=0, resize_y=0, denoising_strength, hr_steps, hr_function,
            hr_schedule, hr_prompt, hr_negative, hr_cfg, first_pass_images=None):
        """Decoded images of the whole hires fix. `first_pass_images`: the 8-bit first-pass images to
        upscale (pixel upscalers), so that both sides start the pixel path from identical bytes."""
        rng = ImageRNG((4, height // 8, width // 8), seeds, source="GPU")
        samples = self._sample(function, prompt, negative, rng, steps, cfg, schedule)
        to_x, to_y, tx, ty = target(width, height, scale, resize_x, resize_y)
        if upscaler in LATENT_MODES:
            mode, antialias = LATENT_MODES[upscaler]
            samples = torch.nn.functional.interpolate(samples, size=(to_y // 8, to_x // 8), mode=mode,
                                                      antialias=antialias)
            own_images = None
        else:
            own_images = [Image.fromarray((255.0 * image).astype(np.uint8)) for image in self.ref.decode(samples)]
            images = first_pass_images or own_images
            pixels = [np.moveaxis(np.array(a1111_resize_image(im, to_x, to_y, upscaler)).astype(np.float32) / 255.0,
                                  2, 0) for im in images]
            samples = self.ref.encode_image(np.stack(pixels) * 2 - 1)
        samples = samples[:, :, ty // 2:samples.shape[2] - (ty + 1) // 2, tx // 2:samples.shape[3] - (tx + 1) // 2]
        hr_rng = ImageRNG(tuple(samples.shape[1:]), seeds, source="GPU")
        n = int(hr_steps / min(denoising_strength, 0.999))
        latents = self._sample(hr_function, hr_prompt, hr_negative, hr_rng, n, hr_cfg, hr_schedule,
                               init_latent=samples, requested_steps=hr_steps)
        return self.ref.decode(latents), own_images
