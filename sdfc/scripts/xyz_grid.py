"""X/Y/Z plot (A1111 scripts/xyz_grid.py): one image per combination of up to three axes' values, a
labelled X×Y grid per Z value, and the Z grids side by side as the main grid.

script_args are A1111's 18, in its order; the axis types are indexes into A1111 1.10's axis list for the
tab (or their labels). The axes the engine has are supported; any other is refused by name.
Value syntax as A1111: comma-separated (CSV quoting), integer ranges `1-5`, `1-9 (+2)`, `1-10 [5]`
(count), float ranges `0.5-1.5 (+0.25)`, `1-2 [5]`.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import os
import random
import re
from dataclasses import dataclass
from io import StringIO
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..api.errors import ApiError
from ..engine import samplers as engine_samplers
from ..engine import schedules as engine_schedules
from ..engine.pipeline import MAX_SEED
from . import grids
from .base import Arg, Context, Job, Output, Picture, Runner, Script, ScriptArgError, grid_picture

# A1111 1.10's axis_options, in order, with the tab each is limited to: an axis type is an index into the
# labels shown for that tab, so the whole list is kept to read indexes as A1111 does.
A1111_AXES = (
    ("Nothing", None), ("Seed", None), ("Var. seed", None), ("Var. strength", None), ("Steps", None),
    ("Hires steps", "txt2img"), ("CFG Scale", None), ("Image CFG Scale", "img2img"), ("Prompt S/R", None),
    ("Prompt order", None), ("Sampler", "txt2img"), ("Hires sampler", "txt2img"), ("Sampler", "img2img"),
    ("Checkpoint name", None), ("Negative Guidance minimum sigma", None), ("Sigma Churn", None),
    ("Sigma min", None), ("Sigma max", None), ("Sigma noise", None), ("Schedule type", None),
    ("Schedule min sigma", None), ("Schedule max sigma", None), ("Schedule rho", None), ("Skip Early CFG", None),
    ("Beta schedule alpha", None), ("Beta schedule beta", None), ("Eta", None), ("Clip skip", None),
    ("Denoising", None), ("Initial noise multiplier", None), ("Extra noise", None), ("Hires upscaler", "txt2img"),
    ("Cond. Image Mask Weight", "img2img"), ("VAE", None), ("Styles", None), ("UniPC Order", None),
    ("Face restore", None), ("Token merging ratio", None), ("Token merging ratio high-res", None),
    ("Always discard next-to-last sigma", None), ("SGM noise multiplier", None), ("Refiner checkpoint", None),
    ("Refiner switch at", None), ("RNG source", None), ("FP8 mode", None), ("Size", None),
)


def axis_labels(mode: str) -> list[str]:
    return [label for label, tab in A1111_AXES if tab in (None, mode)]


# ---------------------------------------------------------------------------------------------------
# Axes: how a value reads, changes a cell's request, and labels the grid

def _with_override(changes: dict, base: dict, key: str, value) -> None:
    overrides = dict(changes.get("override_settings") or base.get("override_settings") or {})
    overrides[key] = value
    changes["override_settings"] = overrides


def _prompt_sr(changes, base, x, xs):
    prompt = changes.get("prompt", base.get("prompt") or "")
    negative = changes.get("negative_prompt", base.get("negative_prompt") or "")
    changes["prompt"], changes["negative_prompt"] = prompt.replace(xs[0], x), negative.replace(xs[0], x)


def _prompt_order(changes, base, x, xs):
    prompt = changes.get("prompt", base.get("prompt") or "")
    order = sorted(((prompt.find(token), token) for token in x), key=lambda t: t[0])
    parts = []
    for _, token in order:  # take the tokens out in the order they appear, put them back in x's order
        n = prompt.find(token)
        parts.append(prompt[:n])
        prompt = prompt[n + len(token):]
    changes["prompt"] = "".join(part + x[i] for i, part in enumerate(parts)) + prompt


def _size(changes, base, x, xs):
    width, _, height = x.partition("x")
    try:
        changes["width"], changes["height"] = int(width.strip()), int(height.strip())
    except ValueError:
        pass  # as A1111: a size that does not read keeps the request's


def _field(name):
    def apply(changes, base, x, xs):
        changes[name] = x
    return apply


def _override(key):
    def apply(changes, base, x, xs):
        _with_override(changes, base, key, x)
    return apply


def _label(axis, x):
    return f"{axis.label}: {round(x, 8) if isinstance(x, float) else x}"


def _plain(axis, x):
    return round(x, 8) if isinstance(x, float) else x


@dataclass(frozen=True)
class Axis:
    label: str
    type: Any                                   # int, float, str or "permutations"
    apply: Callable
    format: Callable = _label
    cost: float = 0.0
    choices: Callable | None = None             # ctx -> values offered by the dropdown
    confirm: Callable | None = None             # (ctx, values) -> None, raises ScriptArgError


def _confirm_samplers(ctx, xs):
    for x in xs:
        try:
            engine_samplers.find_sampler(x)
        except ValueError:
            raise ScriptArgError(f"X/Y/Z plot: Unknown sampler: {x}") from None


def closest_checkpoint(ctx, name: str):
    """A1111's get_closet_checkpoint_match: exact title, name or hash, else the shortest title containing it."""
    engine = ctx.state.engine
    try:
        return engine.find_model(name)
    except Exception:
        found = sorted((m for m in engine.available if name in m.title), key=lambda m: len(m.title))
        return found[0] if found else None


def _confirm_checkpoints(ctx, xs):
    for x in xs:
        if closest_checkpoint(ctx, x) is None:
            raise ScriptArgError(f"X/Y/Z plot: Unknown checkpoint: {x}")


def _checkpoint(ctx):
    def apply(changes, base, x, xs):
        _with_override(changes, base, "sd_model_checkpoint", closest_checkpoint(ctx, x).name)
    return apply


def supported_axes(ctx) -> dict[str, Axis]:
    return {
        "Nothing": Axis("Nothing", str, lambda *a: None, format=lambda axis, x: ""),
        "Seed": Axis("Seed", int, _field("seed")),
        "Var. seed": Axis("Var. seed", int, _field("subseed")),
        "Var. strength": Axis("Var. strength", float, _field("subseed_strength")),
        "Steps": Axis("Steps", int, _field("steps")),
        "CFG Scale": Axis("CFG Scale", float, _field("cfg_scale")),
        "Prompt S/R": Axis("Prompt S/R", str, _prompt_sr, format=_plain),
        "Prompt order": Axis("Prompt order", "permutations", _prompt_order, format=lambda axis, x: ", ".join(x)),
        "Sampler": Axis("Sampler", str, _field("sampler_name"), format=_plain, confirm=_confirm_samplers,
                        choices=lambda c: [s.name for s in engine_samplers.SAMPLERS]),
        "Checkpoint name": Axis("Checkpoint name", str, _checkpoint(ctx), cost=1.0,
                                format=lambda axis, x: os.path.basename(x), confirm=_confirm_checkpoints,
                                choices=lambda c: sorted((m.title for m in c.state.engine.available), key=str.casefold)),
        "Schedule type": Axis("Schedule type", str, _field("scheduler"),
                              choices=lambda c: [engine_schedules.AUTOMATIC] + [s.label for s in engine_schedules.SCHEDULES]),
        "Eta": Axis("Eta", float, _field("eta")),
        "Clip skip": Axis("Clip skip", int, _override("CLIP_stop_at_last_layers")),
        "Denoising": Axis("Denoising", float, _field("denoising_strength")),
        "RNG source": Axis("RNG source", str, _override("randn_source"), choices=lambda c: ["GPU", "CPU", "NV"]),
        "Size": Axis("Size", str, _size),
    }


SUPPORTED = ("Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale", "Prompt S/R", "Prompt order",
             "Sampler", "Checkpoint name", "Schedule type", "Eta", "Clip skip", "Denoising", "RNG source", "Size")


# ---------------------------------------------------------------------------------------------------
# Values

_INT = r"([+-]?\s*\d+)"
_FLOAT = r"([+-]?\s*\d+(?:.\d*)?)"
RANGE = re.compile(rf"\s*{_INT}\s*-\s*{_INT}(?:\s*\(([+-]\d+)\s*\))?\s*")
RANGE_COUNT = re.compile(rf"\s*{_INT}\s*-\s*{_INT}(?:\s*\[(\d+)\s*])?\s*")
RANGE_FLOAT = re.compile(rf"\s*{_FLOAT}\s*-\s*{_FLOAT}(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
RANGE_COUNT_FLOAT = re.compile(rf"\s*{_FLOAT}\s*-\s*{_FLOAT}(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def csv_values(text: str) -> list[str]:
    return [v.strip() for row in csv.reader(StringIO(text), skipinitialspace=True) for v in row]


def csv_string(values: list) -> str:
    with StringIO() as out:
        csv.writer(out).writerow(values)
        return out.getvalue().strip()


def _number(text: str, kind):
    return kind(text.replace(" ", ""))


def expand(axis: Axis, values: list[str], cap: int, where: str) -> list:
    """An axis's values as A1111 reads them; no more than `cap` (checked before any range is made)."""
    def too_many(n):
        return ScriptArgError(f"X/Y/Z plot {where}: {n} values, over the limit of {cap} cells "
                              "(SDFC_MAX_IMAGES)")
    out: list = []
    try:
        if axis.type in (int, float):
            whole = axis.type is int
            for val in values:
                if val.strip() == "":
                    continue
                m = (RANGE if whole else RANGE_FLOAT).fullmatch(val)
                mc = (RANGE_COUNT if whole else RANGE_COUNT_FLOAT).fullmatch(val)
                if m is not None:
                    start, end = _number(m.group(1), axis.type), _number(m.group(2), axis.type)
                    step = _number(m.group(3), axis.type) if m.group(3) is not None else 1
                    if step == 0:
                        raise ScriptArgError(f"X/Y/Z plot {where}: range {val!r} has a step of 0")
                    if whole:
                        n = len(range(start, end + 1, step))
                        if len(out) + n > cap:
                            raise too_many(len(out) + n)
                        out += list(range(start, end + 1, step))
                    else:
                        n = math.ceil((end + step - start) / step)
                        if not math.isfinite(n) or len(out) + max(n, 0) > cap:
                            raise too_many(n)
                        out += np.arange(start, end + step, step).tolist()
                elif mc is not None:
                    start, end = _number(mc.group(1), axis.type), _number(mc.group(2), axis.type)
                    num = int(float(mc.group(3))) if mc.group(3) is not None else 1
                    if len(out) + num > cap:
                        raise too_many(len(out) + num)
                    spaced = np.linspace(start=start, stop=end, num=num).tolist()
                    out += [int(x) for x in spaced] if whole else spaced
                else:
                    out.append(val)
                if len(out) > cap:
                    raise too_many(len(out))
            out = [axis.type(v) for v in out]
            if axis.type is float and not all(math.isfinite(v) for v in out):
                raise ValueError("not finite")
        elif axis.type == "permutations":
            if math.factorial(len(values)) > cap:
                raise too_many(math.factorial(len(values)))
            out = list(itertools.permutations(values))
        else:
            out = [str(v) for v in values]
    except ValueError as exc:
        raise ScriptArgError(f"X/Y/Z plot {where}: a value of {axis.label} does not read: {exc}") from None
    if len(out) > cap:
        raise too_many(len(out))
    return out


# ---------------------------------------------------------------------------------------------------

class XYZPlot(Script):
    title = "X/Y/Z plot"

    def args(self, mode):
        # An axis type is A1111's index for the tab (or a label); only the axes that work are listed.
        labels = tuple(axis_labels(mode))
        shown = tuple(label for label in labels if label in SUPPORTED)
        out = []
        for name, default in (("X", "Seed"), ("Y", "Nothing"), ("Z", "Nothing")):
            out += [Arg(f"{name} type", "index", default, choices=labels, shown=shown),
                    Arg(f"{name} values", "str", ""),
                    Arg(f"{name} values", "list", [], choices=())]
        return out + [
            Arg("Draw legend", "bool", True), Arg("Include Sub Images", "bool", False),
            Arg("Include Sub Grids", "bool", False), Arg("Keep -1 for seeds", "bool", False),
            Arg("Vary seeds for X", "bool", False), Arg("Vary seeds for Y", "bool", False),
            Arg("Vary seeds for Z", "bool", False),
            Arg("Grid margins (px)", "int", 0, minimum=0, maximum=500, step=2),
            Arg("Use text inputs instead of dropdowns", "bool", False),
        ]

    def parse_args(self, mode, raw):
        if isinstance(raw, list):  # as A1111 (`x_type or 0`): a null axis type is Nothing
            raw = [0 if i in (0, 3, 6) and v is None else v for i, v in enumerate(raw)]
        return super().parse_args(mode, raw)

    def prepare(self, ctx: Context, args) -> Job:
        (x_type, x_text, x_drop, y_type, y_text, y_drop, z_type, z_text, z_drop, draw_legend, include_lone,
         include_sub_grids, no_fixed_seeds, vary_x, vary_y, vary_z, margin, csv_mode) = args
        labels = axis_labels(ctx.mode)
        known = supported_axes(ctx)
        cap = ctx.state.settings.max_images

        def axis_of(index: int, name: str) -> Axis:
            label = labels[index]
            if label not in known:
                raise ApiError(400, f"X/Y/Z plot: the {name} axis {label!r} is not supported by sdfc; supported: "
                                    f"{', '.join(known)}", error="NotImplementedError")
            return known[label]

        axes, texts, lists = [], [], []
        for index, text, drop, name in ((x_type, x_text, x_drop, "X"), (y_type, y_text, y_drop, "Y"),
                                        (z_type, z_text, z_drop, "Z")):
            axis = axis_of(index, name)
            if axis.label == "Nothing":
                vals = [0]
            else:
                if axis.choices is not None and not csv_mode:
                    text = csv_string(drop)
                    raw = list(drop)
                else:
                    raw = csv_values(text)
                vals = expand(axis, raw, cap, f"{name} values")
                if not vals:
                    raise ScriptArgError(f"X/Y/Z plot: the {name} axis ({axis.label}) has no values"
                                         + ("" if csv_mode or axis.choices is None else
                                            f" (its values are read from script_args[{3 * 'XYZ'.index(name) + 2}] "
                                            "unless csv_mode, the last argument, is true)"))
                if axis.confirm:
                    axis.confirm(ctx, vals)
            axes.append(axis)
            texts.append(text)
            lists.append(vals)
        xs, ys, zs = lists
        cells = len(xs) * len(ys) * len(zs)
        ctx.check_budget(cells)  # one image per cell

        seed, subseed = ctx.resolve_seeds() if not no_fixed_seeds else (
            ctx.values.get("seed") if ctx.values.get("seed") is not None else -1,
            ctx.values.get("subseed") if ctx.values.get("subseed") is not None else -1)
        if not no_fixed_seeds:
            for i, axis in enumerate(axes):
                if axis.label in ("Seed", "Var. seed"):
                    lists[i][:] = [random.randrange(MAX_SEED) if v in (None, "", -1) else v for v in lists[i]]
        x_axis, y_axis, z_axis = axes

        # Each cell's request; A1111 runs the cell's whole batch and keeps its first image, so one image.
        jobs: dict[tuple[int, int, int], tuple] = {}
        nx, ny = len(xs), len(ys)
        for iz, z in enumerate(zs):
            for iy, y in enumerate(ys):
                for ix, x in enumerate(xs):
                    changes: dict = {"seed": seed, "subseed": subseed}
                    for axis, value, values in ((x_axis, x, xs), (y_axis, y, ys), (z_axis, z, zs)):
                        if axis.label == "Prompt S/R" and values[0] not in (ctx.values.get("prompt") or "") \
                                and values[0] not in (ctx.values.get("negative_prompt") or ""):
                            raise ScriptArgError(f"X/Y/Z plot: Prompt S/R did not find {values[0]} in prompt or "
                                                 "negative prompt.")
                        axis.apply(changes, ctx.values, value, values)
                    if changes["seed"] != -1:
                        changes["seed"] += (ix if vary_x else 0) + (iy * (nx if vary_x else 1) if vary_y else 0) \
                            + (iz * (nx if vary_x else 1) * (ny if vary_y else 1) if vary_z else 0)
                    changes.update(batch_size=1, n_iter=1)
                    req, options = ctx.request(changes)
                    ctx.count(1, req.steps)
                    jobs[(ix, iy, iz)] = (req, options)
        ctx.check_budget(cells)

        # The costliest axis changes least often (A1111: a checkpoint switch is slow): outer, middle, inner.
        cx, cy, cz = x_axis.cost, y_axis.cost, z_axis.cost
        order = "zyx"
        if cx > cy and cx > cz:
            order = "xyz" if cy > cz else "xzy"
        elif cy > cx and cy > cz:
            order = "yxz" if cx > cz else "yzx"
        elif cz > cx and cz > cy:
            order = "zxy" if cx > cy else "zyx"
        sizes = {"x": nx, "y": ny, "z": len(zs)}
        loops = [range(sizes[a]) for a in order]

        def extras(with_z: bool, iz: int) -> dict:
            out = {"Script": self.title}
            for name, axis, text, values in (("X", x_axis, texts[0], xs), ("Y", y_axis, texts[1], ys)) + \
                    ((("Z", z_axis, texts[2], zs),) if with_z else ()):
                if axis.label != "Nothing":
                    out[f"{name} Type"] = axis.label
                    out[f"{name} Values"] = text
                    if axis.label in ("Seed", "Var. seed") and not no_fixed_seeds:
                        out[f"Fixed {name} Values"] = ", ".join(str(v) for v in values)
            return out

        def run(runner: Runner) -> Output:
            cell_pictures: dict[tuple[int, int, int], Picture] = {}
            for a, b, c in itertools.product(*loops):
                pos = dict(zip(order, (a, b, c)))
                key = (pos["x"], pos["y"], pos["z"])
                if runner.interrupted and cell_pictures:
                    break
                req, options = jobs[key]
                made = runner.generate(req, options)
                if made:
                    cell_pictures[key] = made[0]
            if not cell_pictures:
                return Output([], None)
            some = next(iter(cell_pictures.values()))
            ordered = []
            for iz in range(len(zs)):
                for iy in range(ny):
                    for ix in range(nx):
                        pic = cell_pictures.get((ix, iy, iz))
                        # A cell an interrupt left out is black, as A1111's.
                        ordered.append(pic or dataclasses.replace(some, image=Image.new(some.image.mode, some.image.size)))
            # A1111 labels by the first cell's size; the slot size is the same wherever that works, and
            # also where a Size axis makes the first cell smaller than others (A1111 fails there).
            cw, ch = max(p.image.width for p in ordered), max(p.image.height for p in ordered)
            sub_grids = []
            for iz in range(len(zs)):
                block = ordered[iz * nx * ny:(iz + 1) * nx * ny]
                grid = grids.image_grid([p.image for p in block], rows=ny)
                if draw_legend:
                    grid = grids.draw_grid_annotations(
                        grid, cw, ch, [[grids.Label(str(x_axis.format(x_axis, x)))] for x in xs],
                        [[grids.Label(str(y_axis.format(y_axis, y)))] for y in ys], margin)
                first = block[0]
                sub_grids.append(grid_picture(grid, first, runner.infotext(
                    first.result, 0, jobs[(0, 0, iz)][1], extras(False, iz))))
            sw, sh = max(g.image.width for g in sub_grids), max(g.image.height for g in sub_grids)
            main = grids.image_grid([g.image for g in sub_grids], rows=1)
            if draw_legend:
                main = grids.draw_grid_annotations(main, sw, sh, [[grids.Label(str(z_axis.format(z_axis, z)))]
                                                                  for z in zs], [[grids.Label()]])
            first = ordered[0]
            main_pic = grid_picture(main, first, runner.infotext(first.result, 0, jobs[(0, 0, 0)][1],
                                                                 extras(True, 0)))
            pictures = [main_pic] + (sub_grids if include_sub_grids else [])
            returned = pictures + (ordered if include_lone else [])
            return Output(returned, first, unreturned=[] if include_lone else ordered)
        return Job(cells, run)
