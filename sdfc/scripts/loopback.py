"""Loopback (A1111 scripts/loopback.py, img2img): each output becomes the next loop's init image, the
seed counts up by one per loop and the denoising strength moves toward a final value along a curve.
Returns a one-row grid of the loops (of each batch's last image when n_iter > 1) first, then the images;
every image carries the first loop's infotext."""
from __future__ import annotations

import dataclasses
import math

from ..api.errors import ApiError
from . import grids
from .base import Arg, Context, Job, Output, Runner, Script, grid_picture


def denoising_at(loop: int, loops: int, initial: float, final: float, curve: str) -> float:
    if loops == 1:
        return initial
    progress = loop / (loops - 1)
    if curve == "Aggressive":
        shape = math.sin(progress * math.pi * 0.5)
    elif curve == "Lazy":
        shape = 1 - math.cos(progress * math.pi * 0.5)
    else:
        shape = progress
    return initial + (final - initial) * shape


class Loopback(Script):
    title = "Loopback"
    modes = ("img2img",)

    def args(self, mode):
        return [
            Arg("Loops", "int", 4, minimum=1, maximum=32, step=1),
            Arg("Final denoising strength", "float", 0.5, minimum=0, maximum=1, step=0.01),
            Arg("Denoising strength curve", "choice", "Linear", choices=("Aggressive", "Linear", "Lazy")),
            # Interrogation (CLIP, DeepBooru) needs models sdfc does not have: only "None" is offered.
            Arg("Append interrogated prompt at each iteration", "choice", "None", choices=("None",)),
        ]

    def parse_args(self, mode, raw):
        if isinstance(raw, list) and len(raw) > 3 and raw[3] in ("CLIP", "DeepBooru"):
            raise ApiError(400, f"Loopback: appending the {raw[3]} interrogation is not supported by sdfc "
                                "(no interrogation models)", error="NotImplementedError")
        return super().parse_args(mode, raw)

    def prepare(self, ctx: Context, args) -> Job:
        loops, final, curve, _ = args
        extra = {"Final denoising strength": final, "Denoising curve": curve}
        n_iter = int(ctx.values.get("n_iter") or 1)
        initial = ctx.values.get("denoising_strength")
        initial = 0.75 if initial is None else float(initial)
        seed, subseed = ctx.resolve_seeds()
        # One request per loop (its denoising strength); the init image and seed are set as it runs.
        per_loop = []
        for i in range(loops):
            changes = {"denoising_strength": denoising_at(i, loops, initial, final, curve),
                       "seed": seed, "subseed": subseed, "batch_size": 1, "n_iter": 1}
            if i and ctx.values.get("mask"):
                changes["inpainting_fill"] = 1  # as A1111: after the first loop the masked area starts as "original"
            req, options = ctx.request(changes)
            per_loop.append((req, options))
            ctx.count(n_iter, req.steps)
        history = loops if n_iter == 1 else n_iter
        ctx.check_budget(history)
        return_grid = bool(ctx.options["return_grid"])

        def run(runner: Runner) -> Output:
            next_seed = seed
            first_info, pictures = None, []
            for n in range(n_iter):
                init = per_loop[0][0].init_images
                last = None
                for req, options in per_loop:
                    made = runner.generate(req, options, extra, seed=next_seed, init_images=init)
                    if runner.interrupted or not made:
                        break
                    if first_info is None:
                        first_info = made[0].infotext
                    next_seed = made[0].seed + 1
                    if runner.control.skipped:
                        break
                    last = made[0]
                    init = [last.image]
                    if n_iter == 1:
                        pictures.append(last)
                if n_iter > 1 and last is not None and not runner.control.skipped and not runner.interrupted:
                    pictures.append(last)
                if runner.interrupted:
                    break
            if not pictures:
                return Output([], None)
            pictures = [dataclasses.replace(p, infotext=first_info) for p in pictures]
            out = list(pictures)
            if len(pictures) > 1 and return_grid:
                out.insert(0, grid_picture(grids.image_grid([p.image for p in pictures], rows=1), pictures[0]))
            return Output(out, pictures[0], extra_params=extra)
        return Job(loops * n_iter, run)
