"""Prompt matrix (A1111 scripts/prompt_matrix.py): `a | b | c` makes every combination of the optional
parts b, c after (or before) the fixed part a, 2^(parts-1) images, and a grid labelled with the parts."""
from __future__ import annotations

import math

from . import grids
from .base import Arg, Context, Job, Output, Runner, Script, grid_picture


class PromptMatrix(Script):
    title = "Prompt matrix"

    def args(self, mode):
        return [
            Arg("Set at prompt start", "bool", False),
            Arg("Random seeds", "bool", False),
            Arg("Prompt type", "choice", "positive", choices=("positive", "negative")),
            Arg("Joining char", "choice", "comma", choices=("comma", "space")),
            Arg("Grid margins", "int", 0, minimum=0, maximum=500, step=2),
        ]

    def prepare(self, ctx: Context, args) -> Job:
        put_at_start, different_seeds, prompt_type, delimiter_name, margin = args
        field = "prompt" if prompt_type == "positive" else "negative_prompt"
        parts = str(ctx.values.get(field) or "").split("|")
        count = 2 ** (len(parts) - 1) if len(parts) <= 32 else math.inf
        ctx.check_budget(count if count != math.inf else ctx.state.settings.max_images + 1)
        delimiter = ", " if delimiter_name == "comma" else " "
        prompts = []
        for combination in range(count):
            chosen = [text.strip().strip(",") for n, text in enumerate(parts[1:]) if combination & (1 << n)]
            prompts.append(delimiter.join(chosen + [parts[0]] if put_at_start else [parts[0]] + chosen))
        seed, subseed = ctx.resolve_seeds()
        # One engine job per combination: A1111 batches them, but each image depends only on its own prompt
        # and seeds, so the images are the same.
        jobs = []
        for i, prompt in enumerate(prompts):
            req, options = ctx.request({field: prompt, "seed": seed + (i if different_seeds else 0),
                                        "subseed": subseed + i, "batch_size": 1, "n_iter": 1})
            ctx.count(1, req.steps)
            jobs.append((req, options))
        ctx.check_budget(len(prompts))  # grids are not counted: the images the engine makes are
        batch_size = int(ctx.values.get("batch_size") or 1)

        def run(runner: Runner) -> Output:
            pictures = []
            for req, options in jobs:
                if runner.interrupted and pictures:
                    break
                pictures += runner.generate(req, options)
            if not pictures:
                return Output([], None)
            images = [p.image for p in pictures]
            grid = grids.image_grid(images, batch_size, rows=1 << ((len(parts) - 1) // 2))
            if len(images) == len(prompts):  # an interrupted run has no complete matrix to label
                grid = grids.draw_prompt_matrix(grid, images[0].width, images[0].height, parts, margin)
            return Output([grid_picture(grid, pictures[0])] + pictures, pictures[0])
        return Job(len(jobs), run)
