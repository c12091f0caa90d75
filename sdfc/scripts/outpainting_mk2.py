"""Outpainting mk2 (A1111 scripts/outpainting_mk_2.py, img2img): the image grows by `pixels` in each chosen
direction, one direction at a time (left, right, up, down), each an inpainting pass over the new strip.

Before a pass the grown canvas (rounded up to multiples of 64) is filled with noise shaped like the
image's spectrum and histogram-matched to its colours (`matched_noise`, from g-diffuser as A1111 has it, with
scikit-image's `match_histograms` in numpy); the pass generates the part of the canvas next to the new strip
(at most the request's width or height across it), with "original" masked content, the mask blur ×4, and a
latent mask drawn twice the blur further out. As A1111: the totals grow to multiples of 64 (shared between
opposite sides), every pass and batch uses the same seed (its rows seed + i), n_iter × batch_size images
come back (a grid first when more than one), all with the first pass's first infotext.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..api.errors import ApiError
from ..engine.inpaint import ORIGINAL
from . import grids
from .base import Arg, Context, Job, Output, Runner, Script, ScriptArgError, grid_picture

INFO_HTML = ("<p style=\"margin-bottom:0.75em\">Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, "
             "Denoising strength: 0.8</p>")
DIRECTIONS = ("left", "right", "up", "down")
# The noise's FFTs hold a few complex copies of the canvas (some 300 bytes a pixel at the peak): bounded.
MAX_NOISE_PIXELS = 2048 * 1024


# ---------------------------------------------------------------------------------------------------
# scikit-image's exposure.match_histograms, in numpy

def _match_cumulative_cdf(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each source value becomes the reference value at the same quantile: the source's cumulative share
    of each distinct value, interpolated linearly into the reference's cumulative shares."""
    values, where, counts = np.unique(source.ravel(), return_inverse=True, return_counts=True)
    ref_values, ref_counts = np.unique(reference.ravel(), return_counts=True)
    quantiles = np.cumsum(counts) / source.size
    ref_quantiles = np.cumsum(ref_counts) / reference.size
    return np.interp(quantiles, ref_quantiles, ref_values)[where.ravel()].reshape(source.shape)


def match_histograms(image: np.ndarray, reference: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """`image`'s values remapped so that its histogram matches `reference`'s, per channel along
    `channel_axis` (None: one channel). Float images keep their dtype (float16 becomes float32)."""
    image, reference = np.asarray(image), np.asarray(reference)
    if image.ndim != reference.ndim:
        raise ValueError("image and reference must have the same number of dimensions")
    if image.size == 0 or reference.size == 0:
        raise ValueError("image and reference must not be empty")
    if channel_axis is None:
        matched = _match_cumulative_cdf(image, reference)
    else:
        if image.shape[channel_axis] != reference.shape[channel_axis]:
            raise ValueError("image and reference must have the same number of channels")
        src, ref = np.moveaxis(image, channel_axis, -1), np.moveaxis(reference, channel_axis, -1)
        matched = np.stack([_match_cumulative_cdf(src[..., c], ref[..., c]) for c in range(src.shape[-1])],
                           axis=-1)
        matched = np.moveaxis(matched, -1, channel_axis)
    if image.dtype.kind == "f":
        return matched.astype(np.float32 if image.dtype == np.float16 else image.dtype, copy=False)
    return matched


# ---------------------------------------------------------------------------------------------------
# The noise a new strip starts from

def _fft2(data: np.ndarray) -> np.ndarray:
    """Per channel: the orthonormal 2-D FFT with the zero frequency moved to the centre (and back)."""
    axes = (0, 1)
    return np.fft.ifftshift(np.fft.fft2(np.fft.fftshift(data, axes=axes), axes=axes, norm="ortho"), axes=axes)


def _ifft2(data: np.ndarray) -> np.ndarray:
    axes = (0, 1)
    return np.fft.ifftshift(np.fft.ifft2(np.fft.fftshift(data, axes=axes), axes=axes, norm="ortho"), axes=axes)


def _falloff_window(rows: int, cols: int) -> np.ndarray:
    """1 / ((x² + 1)(y² + 1)) over [-1, 1) on each axis, the longer axis stretched by its aspect ratio."""
    short = min(rows, cols)
    x = (np.arange(rows) / rows * 2.0 - 1.0) * (rows / short)
    y = (np.arange(cols) / cols * 2.0 - 1.0) * (cols / short)
    return 1.0 / ((x[:, None] ** 2 + 1.0) * (y[None, :] ** 2 + 1.0))


def matched_noise(image: np.ndarray, mask: np.ndarray, noise_q: float = 1.0,
                  color_variation: float = 0.05) -> np.ndarray:
    """`image` (H, W, 3 floats in [0, 1]) with the white area of `mask` (same shape, [0, 1]) replaced by
    noise whose spectrum follows the unmasked image's (magnitude to the power `noise_q`) and whose colours
    are histogram-matched to the unmasked pixels; `color_variation` 0 is grey noise, 1 fully coloured.
    Deterministic (the generator is seeded with 0, so only the job's seed varies the outpainting)."""
    grey = mask.sum(axis=2) / 3.0
    repaint, known = grey > 1e-6, grey < 1e-3
    if not known.any():
        raise ValueError("the mask leaves no known pixel to match the noise to")
    windowed = image * (1.0 - np.repeat(grey[:, :, None], 3, axis=2))
    peak = windowed.max()
    if peak > 0:  # (an all-black known area would divide by 0 and give NaN)
        windowed = windowed / peak
    # The masked area holds the image's average rather than black: a better spectrum to imitate.
    windowed = windowed + np.average(image) * mask
    spectrum = _fft2(windowed)
    magnitude = np.abs(spectrum)
    with np.errstate(invalid="ignore", divide="ignore"):
        phase = np.where(magnitude > 0, spectrum / magnitude, 0)

    rng = np.random.default_rng(0)
    noise = rng.random(image.shape)
    noise_grey = noise.sum(axis=2) / 3.0
    noise = noise * color_variation + ((1.0 - color_variation) * noise_grey)[:, :, None]
    noise = np.real(_ifft2(_fft2(noise) * _falloff_window(*image.shape[:2])[:, :, None]))
    shaped = np.real(_ifft2(np.abs(_fft2(noise)) ** 2 * magnitude ** noise_q * phase))
    shaped = shaped - shaped.min()
    top = shaped.max()
    if top > 0:
        shaped = shaped / top
    shaped[repaint, :] = match_histograms(shaped[repaint, :], image[known, :], channel_axis=1)
    return np.clip(image * (1.0 - mask) + shaped * mask, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# The passes

def direction_arg() -> Arg:
    """The "Outpainting direction" checkbox group: a list of the directions (A1111's default: all four)."""
    return Arg("Outpainting direction", "list", list(DIRECTIONS), choices=DIRECTIONS, max_len=64)


def check_directions(title: str, directions: list[str]) -> None:
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ScriptArgError(f"{title}: unknown outpainting direction {unknown[0][:20]!r}; choose from "
                             f"{', '.join(DIRECTIONS)}")


def _ceil64(value: int) -> int:
    return math.ceil(value / 64) * 64


def grow_sides(init_size: tuple[int, int], pixels: int, directions) -> dict[str, int]:
    """Pixels added on each side (both outpainting scripts): `pixels` per chosen direction, the totals
    then rounded up to multiples of 64, the extra shared between opposite sides."""
    w, h = init_size
    grow = {d: pixels if d in directions else 0 for d in DIRECTIONS}
    target_w, target_h = _ceil64(w + grow["left"] + grow["right"]), _ceil64(h + grow["up"] + grow["down"])
    if grow["left"]:
        grow["left"] = grow["left"] * (target_w - w) // (grow["left"] + grow["right"])
    if grow["right"]:
        grow["right"] = target_w - w - grow["left"]
    if grow["up"]:
        grow["up"] = grow["up"] * (target_h - h) // (grow["up"] + grow["down"])
    if grow["down"]:
        grow["down"] = target_h - h - grow["up"]
    return grow


def rectangle_mask(size: tuple[int, int], box: tuple[int, int, int, int], mode: str = "RGB") -> Image.Image:
    """A white image with `box` (corners included, as Pillow draws) black; A1111's mask drawing."""
    image = Image.new(mode, size, "white")
    try:
        ImageDraw.Draw(image).rectangle(box, fill="black")
    except ValueError:  # Pillow refuses a rectangle whose far corner comes before its near one, as in A1111
        raise ApiError(400, f"the mask blur is too large for the image: its unmasked rectangle {box} is empty",
                       error="ValueError") from None
    return image


@dataclass
class Pass:
    """One direction's inpainting pass over images of `before` size, making images of `after` size."""
    side: str
    pixels: int
    before: tuple[int, int]
    after: tuple[int, int]
    canvas: tuple[int, int]          # `after` rounded up to multiples of 64: what the noise fills
    job: tuple[int, int]             # the generated part's size (the engine job's width, height)
    crop: tuple[int, int, int, int]  # where in the canvas the job's images come from and go back to
    canvas_mask: Image.Image         # white where the canvas is repainted (noise, the job's mask)
    latent_mask: Image.Image
    noise: tuple[float, float] = (1.0, 0.05)  # matched_noise's noise_q, color_variation


def plan_passes(init_size, process_size, pixels: int, directions, blur: int,
                noise: tuple[float, float] = (1.0, 0.05)) -> list[Pass]:
    """The passes A1111 runs for an init image of `init_size` and the request's width x height."""
    w, h = init_size
    blur_x = blur if {"left", "right"} & set(directions) else 0
    blur_y = blur if {"up", "down"} & set(directions) else 0
    grow = grow_sides(init_size, pixels, directions)
    final_w, final_h = w + grow["left"] + grow["right"], h + grow["up"] + grow["down"]
    if _ceil64(final_w) * _ceil64(final_h) > MAX_NOISE_PIXELS:  # the last canvas, the largest
        raise ApiError(400, f"Outpainting mk2: the outpainted image would be {final_w}x{final_h}, over the limit "
                            f"of {MAX_NOISE_PIXELS} pixels for its noise", error="LimitExceeded")
    passes, size = [], (w, h)
    for side in DIRECTIONS:
        px = grow[side]
        if px <= 0:
            continue
        left, right, up, down = (side == d for d in DIRECTIONS)
        horiz = left or right
        res_w, res_h = size[0] + (px if horiz else 0), size[1] + (0 if horiz else px)
        canvas_w, canvas_h = _ceil64(res_w), _ceil64(res_h)
        mask = rectangle_mask((canvas_w, canvas_h), (
            px + blur_x if left else 0, px + blur_y if up else 0,
            canvas_w - px - blur_x if right else res_w, canvas_h - px - blur_y if down else res_h))
        job_w = min(process_size[0], res_w) if horiz else canvas_w
        job_h = canvas_h if horiz else min(process_size[1], res_h)
        crop = (0 if left else canvas_w - job_w, 0 if up else canvas_h - job_h,
                job_w if left else canvas_w, job_h if up else canvas_h)
        # Drawn with the cropped mask's size for the far sides, as A1111 does.
        latent = rectangle_mask((job_w, job_h), (
            px + blur_x * 2 if left else 0, px + blur_y * 2 if up else 0,
            job_w - px - blur_x * 2 if right else res_w, job_h - px - blur_y * 2 if down else res_h))
        if not (np.asarray(mask)[:, :, 0] == 0).any():
            raise ApiError(400, f"Outpainting mk2: the mask blur leaves no original pixel to match the {side} "
                                "noise to (A1111 fails here too)", error="ValueError")
        passes.append(Pass(side, px, size, (res_w, res_h), (canvas_w, canvas_h), (job_w, job_h), crop,
                           mask, latent, noise))
        size = (res_w, res_h)
    return passes


def noise_canvas(image: Image.Image, step: Pass) -> Image.Image:
    """The pass's canvas: the image at its place (Pillow's paste converts its mode), the rest noise."""
    canvas = Image.new("RGB", step.canvas)
    canvas.paste(image, (step.pixels if step.side == "left" else 0, step.pixels if step.side == "up" else 0))
    pixels = np.asarray(canvas) / 255.0
    mask = np.asarray(step.canvas_mask) / 255.0
    noised = matched_noise(pixels, mask, *step.noise)
    return Image.fromarray(np.clip(noised * 255.0, 0.0, 255.0).astype(np.uint8), mode="RGB")


def paste_back(canvas: Image.Image, generated: Image.Image, step: Pass) -> Image.Image:
    at = (0 if step.side == "left" else canvas.width - generated.width,
          0 if step.side == "up" else canvas.height - generated.height)
    canvas = canvas.copy()
    canvas.paste(generated, at)
    return canvas.crop((0, 0, *step.after))


class OutpaintingMk2(Script):
    title = "Outpainting mk2"
    modes = ("img2img",)

    def args(self, mode):
        return [
            Arg("", "html", INFO_HTML),
            Arg("Pixels to expand", "int", 128, minimum=8, maximum=256, step=8),
            Arg("Mask blur", "int", 8, minimum=0, maximum=64, step=1),
            direction_arg(),
            Arg("Fall-off exponent (lower=higher detail)", "float", 1.0, minimum=0.0, maximum=4.0, step=0.01),
            Arg("Color variation", "float", 0.05, minimum=0.0, maximum=1.0, step=0.01),
        ]

    def parse_args(self, mode, raw):
        args = super().parse_args(mode, raw)
        check_directions(self.title, args[3])
        return args

    def prepare(self, ctx: Context, args) -> Job:
        _, pixels, blur, directions, noise_q, color_variation = args
        batch_size = int(ctx.values.get("batch_size") or 1)
        n_iter = int(ctx.values.get("n_iter") or 1)
        seed, subseed = ctx.resolve_seeds()
        base = {"seed": seed, "subseed": subseed, "n_iter": 1, "mask": None, "latent_mask": None,
                "inpaint_full_res": False, "inpainting_fill": ORIGINAL}
        template, _ = ctx.request(base)
        source = template.init_images[0]
        passes = plan_passes(source.size, (template.width, template.height), pixels, directions, blur,
                             (noise_q, color_variation))
        if not passes:
            raise ApiError(400, "Outpainting mk2: choose at least one direction", error="ValueError")
        blur_x = blur * 4 if any(p.side in ("left", "right") for p in passes) else 0
        blur_y = blur * 4 if any(p.side in ("up", "down") for p in passes) else 0
        jobs = []
        for step in passes:
            req, options = ctx.request(dict(base, width=step.job[0], height=step.job[1]))
            req = dataclasses.replace(req, mask=step.canvas_mask.crop(step.crop), latent_mask=step.latent_mask,
                                      inpaint=dataclasses.replace(req.inpaint, mask_blur_x=blur_x,
                                                                  mask_blur_y=blur_y))
            jobs.append((step, req, options))
            ctx.count(batch_size * n_iter, req.steps)
        ctx.check_budget(batch_size * n_iter)
        want_grid = bool(ctx.options["return_grid"]) and not (
            batch_size * n_iter < 2 and bool(ctx.options["grid_only_if_multiple"]))

        def run(runner: Runner) -> Output:
            first_info, finals = None, []
            for _ in range(n_iter):
                images, made = [source] * batch_size, []
                for step, req, options in jobs:
                    canvases = [noise_canvas(image, step) for image in images]
                    made = runner.generate(req, options, seed=seed,
                                           init_images=[c.crop(step.crop) for c in canvases])
                    if runner.interrupted or len(made) < batch_size:
                        return _output(finals, first_info, want_grid)
                    if first_info is None:
                        first_info = made[0].infotext
                    images = [paste_back(c, m.image, step) for c, m in zip(canvases, made)]
                finals += [dataclasses.replace(m, image=image) for m, image in zip(made, images)]
            return _output(finals, first_info, want_grid)
        return Job(n_iter * len(passes), run)


def _output(finals, first_info, want_grid) -> Output:
    if not finals:
        return Output([], None)
    finals = [dataclasses.replace(p, infotext=first_info) for p in finals]
    # Processed(p, …, initial seed, initial info): the info describes the last pass's job, the first seed.
    first = dataclasses.replace(finals[-1], seed=finals[0].seed)
    pictures = list(finals)
    if want_grid:
        pictures.insert(0, grid_picture(grids.image_grid([p.image for p in finals]), finals[0]))
    return Output(pictures, first)
