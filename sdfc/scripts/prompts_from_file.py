"""Prompts from file or textbox (A1111 scripts/prompts_from_file.py): one job per non-empty line; a line
with `--` is read as command-line options (`--prompt "…" --steps 10 --seed 5`), others as a prompt added
to the request's prompt. No grid: the images of every line, in order."""
from __future__ import annotations

import shlex

from ..engine import ModelNotFoundError
from ..engine import samplers
from .base import Arg, Context, Job, Output, Runner, Script


def _flag(text: str) -> bool:
    return text == "true"


# The options a line may set and how their values read (A1111's prompt_tags); "sd_model" picks a checkpoint.
LINE_OPTIONS = {
    "sd_model": str, "outpath_samples": str, "outpath_grids": str, "prompt_for_display": str, "prompt": str,
    "negative_prompt": str, "styles": str, "seed": int, "subseed_strength": float, "subseed": int,
    "seed_resize_from_h": int, "seed_resize_from_w": int, "sampler_index": int, "sampler_name": str,
    "batch_size": int, "n_iter": int, "steps": int, "cfg_scale": float, "width": int, "height": int,
    "restore_faces": _flag, "tiling": _flag, "do_not_save_samples": _flag, "do_not_save_grid": _flag,
}
# Options that change nothing in an API answer (file paths, saving, display, a legacy index) or that
# A1111 itself mishandles (styles as a string): read for their syntax, then dropped.
IGNORED = {"outpath_samples", "outpath_grids", "prompt_for_display", "do_not_save_samples", "do_not_save_grid",
           "sampler_index", "styles"}


class LineError(ValueError):
    pass


def parse_line(line: str, find_model, find_sampler) -> dict:
    """The options of one `--` line (A1111's cmdargs). Raises LineError where A1111's parse fails."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise LineError(str(exc)) from None
    out, pos = {}, 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise LineError(f'must start with "--": {word}')
        if pos + 1 >= len(words):
            raise LineError(f"missing argument for command line option {word}")
        tag = word[2:]
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            text = words[pos]
            pos += 1
            while pos < len(words) and not words[pos].startswith("--"):
                text += " " + words[pos]
                pos += 1
            out[tag] = text
            continue
        kind = LINE_OPTIONS.get(tag)
        if kind is None:
            raise LineError(f"unknown commandline option: {word}")
        raw = words[pos + 1]
        try:
            if tag == "sd_model":
                out[tag] = find_model(raw)
            elif tag == "sampler_name":
                out[tag] = find_sampler(raw)
            else:
                out[tag] = kind(raw)
        except (ValueError, OverflowError, ModelNotFoundError) as exc:
            raise LineError(str(exc)) from None
        pos += 2
    return out


class PromptsFromFile(Script):
    title = "Prompts from file or textbox"

    def args(self, mode):
        return [
            Arg("Iterate seed every line", "bool", False),
            Arg("Use same random seed for all lines", "bool", False),
            Arg("Insert prompts at the", "choice", "start", choices=("start", "end")),
            Arg("List of prompt inputs", "str", ""),
        ]

    def prepare(self, ctx: Context, args) -> Job:
        iterate, same_random, position, text = args

        def find_sampler(name: str):
            try:  # A1111 maps names and aliases, any case; an unknown one becomes None (the default)
                return samplers.find_sampler(name).name
            except ValueError:
                return None

        def find_model(name: str) -> str:
            return ctx.state.engine.find_model(name).name

        lines = [x for x in (x.strip() for x in text.splitlines()) if x]
        if len(lines) > ctx.state.settings.max_images:
            ctx.check_budget(len(lines))
        seed = ctx.values.get("seed")
        seed = -1 if seed is None else seed
        if (iterate or same_random) and seed == -1:
            seed, _ = ctx.resolve_seeds()
        base_prompt = ctx.values.get("prompt") or ""
        base_negative = ctx.values.get("negative_prompt") or ""
        batch = int(ctx.values.get("batch_size") or 1) * int(ctx.values.get("n_iter") or 1)
        jobs, returned = [], 0
        for line in lines:
            options = {"prompt": line}
            if "--" in line:
                try:
                    options = parse_line(line, find_model, find_sampler)
                except LineError:
                    options = {"prompt": line}  # as A1111: a line that does not parse is a prompt
            changes = {k: v for k, v in options.items() if k not in IGNORED and k != "sd_model"}
            if options.get("sd_model"):
                changes["override_settings"] = {**(ctx.values.get("override_settings") or {}),
                                                "sd_model_checkpoint": options["sd_model"]}
            if changes.get("sampler_name", "") is None:
                del changes["sampler_name"]
            if options.get("prompt") and base_prompt:
                changes["prompt"] = (f"{options['prompt']} {base_prompt}" if position == "start"
                                     else f"{base_prompt} {options['prompt']}")
            if options.get("negative_prompt") and base_negative:
                changes["negative_prompt"] = (f"{options['negative_prompt']} {base_negative}" if position == "start"
                                              else f"{base_negative} {options['negative_prompt']}")
            changes.setdefault("seed", seed)
            req, opts = ctx.request(changes)
            jobs.append((req, opts))
            returned += req.batch_size * req.n_iter
            ctx.count(req.batch_size * req.n_iter, req.steps)
            if iterate:
                seed += batch  # the request's batch, not the line's (A1111)
        ctx.check_budget(returned)

        def run(runner: Runner) -> Output:
            pictures = []
            for req, opts in jobs:
                if runner.interrupted and pictures:
                    break
                pictures += runner.generate(req, opts)
            return Output(pictures, pictures[0] if pictures else None)
        return Job(sum(req.n_iter for req, _ in jobs), run)
