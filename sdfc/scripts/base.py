"""What every built-in script shares: its arguments as A1111's `ui()` returns them, checked hostilely; the
context that turns request values into engine jobs before the queue is taken; and the runner that runs
them inside the queue, keeps progress over all of them, and answers as A1111 (grids first).

A script `prepare`s everything it can check (arguments, every engine request, the work bound) before it
queues, so that a bad request is a 4xx at once and a task is refused at submit; its `Job.run` then only
generates and combines.
"""
from __future__ import annotations

import base64
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from ..api import generation, payloads
from ..api.errors import ApiError
from ..api.infotext import create_infotext, info_json
from ..api.schema import Invalid
from ..api.state import ApiState
from ..engine import GenerationRequest, GenerationResult, JobControl
from ..engine.pipeline import resolve_seed

MAX_TEXT = 65536  # characters in one text argument (a prompt list, axis values)


class ScriptArgError(ApiError):
    def __init__(self, detail: str):
        super().__init__(400, detail, error="ValueError")


@dataclass(frozen=True)
class Arg:
    """One argument, as its A1111 UI component: `kind` is bool, int, float, str, choice (a value of
    `choices`), index (a position in `choices`, or its name) or html (ignored)."""
    label: str
    kind: str
    value: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple | None = None
    max_len: int = MAX_TEXT
    shown: tuple | None = None  # the choices `/script-info` lists where not all of `choices` work

    def info(self) -> dict:
        """A1111's ScriptArg (`/script-info`)."""
        choices = self.shown if self.shown is not None else self.choices
        return {"label": self.label, "value": self.value, "minimum": self.minimum, "maximum": self.maximum,
                "step": self.step, "choices": list(choices) if choices is not None else None}

    def parse(self, raw: Any, where: str) -> Any:
        def bad(why: str):
            return ScriptArgError(f"{where} ({self.label or self.kind}): {why}, got {str(raw)[:60]!r}")
        if self.kind == "html":
            return None
        if self.kind == "bool":
            if isinstance(raw, bool) or (isinstance(raw, int) and raw in (0, 1)):
                return bool(raw)
            raise bad("must be true or false")
        if self.kind in ("int", "float"):
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
                raise bad("must be a finite number")
            if self.kind == "int":
                if raw != int(raw):
                    raise bad("must be an integer")
                raw = int(raw)
            if (self.minimum is not None and raw < self.minimum) or (self.maximum is not None and raw > self.maximum):
                raise bad(f"must be between {self.minimum} and {self.maximum}")
            return float(raw) if self.kind == "float" else raw
        if self.kind in ("str", "choice"):
            if not isinstance(raw, str):
                raise bad("must be a string")
            if len(raw) > self.max_len:
                raise bad(f"is longer than {self.max_len} characters")
            if self.kind == "choice" and raw not in self.choices:
                raise bad(f"must be one of {', '.join(map(str, self.choices))}")
            return raw
        if self.kind == "list":  # a multiselect dropdown's values
            if not isinstance(raw, list) or len(raw) > 1024:
                raise bad("must be a list of at most 1024 values")
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in raw) \
                    or sum(len(str(v)) for v in raw) > self.max_len:
                raise bad(f"must hold strings or numbers, {self.max_len} characters in all at most")
            return [str(v) for v in raw]
        if self.kind == "index":
            if isinstance(raw, str):  # A1111's scripts accept the name for an index over the API
                names = [str(c).lower() for c in self.choices]
                if raw.lower() not in names:
                    raise bad(f"must be one of {', '.join(map(str, self.choices))} (or its index)")
                return names.index(raw.lower())
            if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < len(self.choices):
                raise bad(f"must be an index below {len(self.choices)} or one of {', '.join(map(str, self.choices))}")
            return raw
        raise AssertionError(self.kind)


@dataclass
class Picture:
    """One image of the answer and what its record and info need."""
    image: Image.Image
    infotext: str
    prompt: str
    negative_prompt: str
    seed: int
    subseed: int
    result: GenerationResult
    is_grid: bool = False


@dataclass
class Output:
    pictures: list[Picture]                    # grids first, as A1111 returns them
    first: Picture | None                      # whose request the info's top-level fields describe
    extra_params: dict = field(default_factory=dict)
    # Images made but not returned whose infotexts, prompts and seeds A1111's info still lists
    # (X/Y/Z plot's cells without "Include Sub Images").
    unreturned: list[Picture] = field(default_factory=list)


class Context:
    """The request as the script sees it, and the builder of its engine requests (all checks included)."""

    def __init__(self, state: ApiState, values: dict, mode: str, options: dict, script: "Script"):
        self.state, self.values, self.mode, self.options, self.script = state, values, mode, options, script
        self.base = {k: v for k, v in values.items() if k not in ("script_name", "script_args")}
        self.total_images = 0   # images the engine will make, over every job
        self.total_steps = 0    # and their sampling steps: the work bound

    def request(self, changes: dict | None = None) -> tuple[GenerationRequest, dict]:
        """An engine request for the base values with `changes`, through every check a plain request gets;
        also the options it runs with."""
        values = dict(self.base)
        # What a script sets goes through the field checks a request body gets (type, range).
        fields = {f.name: f for f in (payloads.TXT2IMG if self.mode == "txt2img" else payloads.IMG2IMG).fields}
        for key, value in (changes or {}).items():
            if key in fields:
                try:
                    value = fields[key].coerce(value)
                except Invalid as exc:
                    raise ScriptArgError(f"script '{self.script.title}': {key} {str(value)[:60]!r}: {exc.msg}") from None
            values[key] = value
        options = self.state.options.with_overrides(values.get("override_settings"))
        return generation.build_request(self.state, values, self.mode, options), options

    def resolve_seeds(self) -> tuple[int, int]:
        """A1111's fix_seed: -1 becomes a random seed (and subseed) once, for every job of the script."""
        return (resolve_seed(generation._value(self.values, "seed", -1)),
                resolve_seed(generation._value(self.values, "subseed", -1)))

    def count(self, images: int, steps: int) -> None:
        self.total_images += images
        self.total_steps += images * steps

    def check_budget(self, returned: int) -> None:
        """A script may return no more images than a plain request (SDFC_MAX_IMAGES) and cost no more
        sampling work than the largest plain request (SDFC_MAX_IMAGES × SDFC_MAX_STEPS image-steps)."""
        s = self.state.settings
        if returned > s.max_images:
            raise ApiError(400, f"script '{self.script.title}' would return {returned} images, over the limit of "
                                f"{s.max_images} images per request (SDFC_MAX_IMAGES)", error="LimitExceeded")
        work = s.max_images * s.max_steps
        if self.total_steps > work:
            raise ApiError(400, f"script '{self.script.title}' would run {self.total_images} images × their steps "
                                f"= {self.total_steps} image-steps, over the limit of {work} (SDFC_MAX_IMAGES × "
                                "SDFC_MAX_STEPS); use fewer values, tiles or steps", error="LimitExceeded")


class SubJobControl:
    """The JobControl one engine job sees: its batches count on in the script's control (job_no offset),
    the script's total stays the job_count, interrupt and skip come from the script's control."""

    def __init__(self, parent: JobControl, offset: int, total: int):
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_offset", offset)
        parent.job_count = total

    def __getattr__(self, name):
        value = getattr(self._parent, name)
        return value - self._offset if name == "job_no" else value

    def __setattr__(self, name, value):
        if name == "job_count":
            return  # the script's total stands
        if name == "job_no":
            value += self._offset
        setattr(self._parent, name, value)


class Runner:
    """Runs a prepared job's engine requests inside the queue; counts engine seconds for the records."""

    def __init__(self, ctx: Context, control: JobControl, total_jobs: int):
        self.ctx, self.control, self.total_jobs = ctx, control, total_jobs
        self.done = 0
        self.engine_seconds = 0.0

    @property
    def interrupted(self) -> bool:
        return self.control.interrupted

    def generate(self, req: GenerationRequest, options: dict, extra: dict | None = None,
                 **changes) -> list[Picture]:
        """One engine job (`changes` replace request fields: seed, init_images, …); a Picture per image."""
        if changes:
            req = dataclasses.replace(req, **changes)
        self.control.skipped = False
        sub = SubJobControl(self.control, self.done, self.total_jobs)
        started = time.perf_counter()
        result = generation.generate_queued(self.ctx.state, req, sub)
        self.engine_seconds += time.perf_counter() - started
        self.done += req.n_iter
        self.control.job_no = min(self.done, self.total_jobs)
        return [Picture(image, self.infotext(result, i, options, extra), result.prompts[i],
                        result.negative_prompts[i], result.seeds[i], result.subseeds[i], result)
                for i, image in enumerate(result.images)]

    def infotext(self, result: GenerationResult, index: int, options: dict, extra: dict | None) -> str:
        params = generation.infotext_params(result, index, options, self.ctx.mode)
        params.update(extra or {})
        return create_infotext(result.prompts[index], result.negative_prompts[index], params)


def grid_picture(image: Image.Image, like: Picture, infotext: str | None = None) -> Picture:
    return dataclasses.replace(like, image=image, infotext=like.infotext if infotext is None else infotext,
                               is_grid=True)


@dataclass
class Job:
    """A prepared script run: `engine_jobs` engine batches in all, `run(runner)` makes the Output."""
    engine_jobs: int
    run: Callable[[Runner], Output]


class Script:
    title: str = ""
    modes: tuple[str, ...] = ("txt2img", "img2img")

    @property
    def name(self) -> str:
        return self.title.lower()  # A1111 names scripts by their lower-cased title

    def args(self, mode: str) -> list[Arg]:
        raise NotImplementedError

    def parse_args(self, mode: str, raw: Any) -> list:
        """script_args in A1111's order; missing trailing ones take the UI defaults."""
        specs = self.args(mode)
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise ScriptArgError(f"script_args must be a list, got {type(raw).__name__}")
        if len(raw) > len(specs):
            raise ScriptArgError(f"script '{self.title}' takes {len(specs)} script_args "
                                 f"({', '.join(a.label or a.kind for a in specs)}), got {len(raw)}")
        parsed = []
        for i, spec in enumerate(specs):
            value = raw[i] if i < len(raw) else None
            if value is None:  # null or missing: the component's default
                parsed.append(spec.value if spec.kind not in ("index",) else _default_index(spec))
            else:
                parsed.append(spec.parse(value, f"script_args[{i}]"))
        return parsed

    def prepare(self, ctx: Context, args: list) -> Job:
        raise NotImplementedError

    def info(self, mode: str) -> dict:
        """A1111's ScriptInfo (`/script-info`)."""
        return {"name": self.name, "is_alwayson": False, "is_img2img": mode == "img2img",
                "args": [a.info() for a in self.args(mode)]}


def _default_index(spec: Arg) -> int:
    return list(spec.choices).index(spec.value) if spec.value in spec.choices else 0


# ---------------------------------------------------------------------------------------------------
# The answer

def build_response(ctx: Context, output: Output, timestamp: str, record_key: str) -> tuple[dict, list[dict]]:
    """A1111's response for a script run (images grids first) and one record per returned image."""
    options, values = ctx.options, ctx.values
    fmt = options["samples_format"]
    first = output.first
    if first is None:  # interrupted before any image
        return _empty_response(ctx, timestamp), []
    result, req = first.result, first.result.request
    encoded, records = [], []
    for i, pic in enumerate(output.pictures):
        data = generation._encode(pic.image, fmt, pic.infotext if options["enable_pnginfo"] else None,
                                  int(options["jpeg_quality"]))
        encoded.append(data)
        preq = pic.result.request
        records.append({
            "request_id": record_key, "image_index": i, "prompt": pic.prompt, "negative_prompt": pic.negative_prompt,
            "steps": preq.steps, "seed": pic.seed, "sampler": pic.result.sampler_name, "cfg_scale": preq.cfg_scale,
            "size": f"{pic.image.width}x{pic.image.height}", "model_hash": pic.result.model.short_hash,
            "model": pic.result.model.name, "infotext": pic.infotext, "image_format": fmt, "image_bytes": data,
        })
    images = [p for p in output.pictures if not p.is_grid] + output.unreturned
    grids = sum(p.is_grid for p in output.pictures)
    info = info_json(
        prompt=req.prompt, negative_prompt=req.negative_prompt, seed=first.seed, subseed=first.subseed,
        subseed_strength=req.subseed_strength, width=req.width, height=req.height,
        sampler_name=result.sampler_name, cfg_scale=req.cfg_scale, steps=req.steps,
        infotexts=[p.infotext for p in output.pictures + output.unreturned],
        all_prompts=[p.prompt for p in images] or [req.prompt],
        all_negative_prompts=[p.negative_prompt for p in images] or [req.negative_prompt],
        all_seeds=[p.seed for p in images] or [first.seed], all_subseeds=[p.subseed for p in images] or [first.subseed],
        batch_size=req.batch_size, sd_model_name=result.model.name, sd_model_hash=result.model.short_hash,
        seed_resize_from_w=req.seed_resize_from_w, seed_resize_from_h=req.seed_resize_from_h,
        denoising_strength=req.denoising_strength if ctx.mode == "img2img" else values.get("denoising_strength"),
        extra_generation_params={"Schedule type": generation._schedule_label(result), **output.extra_params},
        index_of_first_image=1 if grids else 0, styles=values.get("styles") or [], job_timestamp=timestamp,
        clip_skip=int(options["CLIP_stop_at_last_layers"]),
    )
    parameters = dict(values)
    if ctx.mode == "img2img" and not values.get("include_init_images"):
        parameters["init_images"] = None
        parameters["mask"] = None
    send = generation._value(values, "send_images", True)
    return {"images": [base64.b64encode(d).decode("ascii") for d in encoded] if send else [],
            "parameters": parameters, "info": info}, records


def _empty_response(ctx: Context, timestamp: str) -> dict:
    v = ctx.values

    def value(key, default):
        return generation._value(v, key, default)
    info = info_json(prompt=value("prompt", ""), negative_prompt=value("negative_prompt", ""), seed=value("seed", -1),
                     subseed=value("subseed", -1), subseed_strength=value("subseed_strength", 0.0),
                     width=value("width", 512), height=value("height", 512),
                     sampler_name=v.get("sampler_name") or value("sampler_index", "Euler"),
                     cfg_scale=value("cfg_scale", 7.0), steps=value("steps", 50), infotexts=[],
                     all_prompts=[], all_negative_prompts=[], all_seeds=[], all_subseeds=[],
                     job_timestamp=timestamp, clip_skip=int(ctx.options["CLIP_stop_at_last_layers"]))
    parameters = dict(v)
    if ctx.mode == "img2img" and not v.get("include_init_images"):
        parameters["init_images"] = None
        parameters["mask"] = None
    return {"images": [], "parameters": parameters, "info": info}
