"""A1111's built-in scripts, run by `script_name` / `script_args` (txt2img and img2img).

Each script is one module; SCRIPTS lists them in A1111's order (its scripts/ folder, sorted by file name),
which is the order `/scripts` and `/script-info` answer in. A script orchestrates several engine jobs on
the API side: it builds engine requests through the same checks as a plain request, runs them inside the
one queue slot its request holds, and combines the results (grids first, as A1111 returns them).
"""
from __future__ import annotations

import logging

from ..api import generation
from ..api.errors import ApiError
from ..api.state import ApiState
from ..engine import JobControl
from .base import Context, Job, Runner, Script, build_response
from .loopback import Loopback
from .outpainting_mk2 import OutpaintingMk2
from .poor_mans_outpainting import PoorMansOutpainting
from .prompt_matrix import PromptMatrix
from .prompts_from_file import PromptsFromFile
from .sd_upscale import SDUpscale
from .xyz_grid import XYZPlot

log = logging.getLogger("sdfc.scripts")

SCRIPTS: tuple[Script, ...] = (Loopback(), OutpaintingMk2(), PoorMansOutpainting(), PromptMatrix(), PromptsFromFile(),
                               SDUpscale(), XYZPlot())


def scripts_for(mode: str) -> list[Script]:
    return [s for s in SCRIPTS if mode in s.modes]


def find_script(name, mode: str) -> Script:
    """By title, case-insensitive, as A1111's API; anything else is its 422."""
    if isinstance(name, str):
        for script in scripts_for(mode):
            if script.name == name.lower():
                return script
    raise ApiError(422, f"Script '{name}' not found")


def scripts_list() -> dict:
    """`/sdapi/v1/scripts`: the selectable scripts per tab, by name."""
    return {mode: [s.name for s in scripts_for(mode)] for mode in ("txt2img", "img2img")}


def script_info() -> list[dict]:
    """`/sdapi/v1/script-info`: the txt2img scripts, then the img2img ones."""
    return [s.info(mode) for mode in ("txt2img", "img2img") for s in scripts_for(mode)]


def _prepare(state: ApiState, values: dict, mode: str) -> tuple[Context, Job]:
    script = find_script(values.get("script_name"), mode)
    generation._check_unsupported({k: v for k, v in values.items() if k != "script_name"}, mode)
    options = state.options.with_overrides(values.get("override_settings"))
    ctx = Context(state, values, mode, options, script)
    args = script.parse_args(mode, values.get("script_args"))
    return ctx, script.prepare(ctx, args)


def prepare_script(state: ApiState, values: dict, mode: str) -> None:
    """Every check a script run gets before it queues (a task's submit)."""
    _prepare(state, values, mode)


def run_script(state: ApiState, values: dict, mode: str, request_id: str, record_key: str,
               control: JobControl, user: str, task_id: str | None) -> dict:
    ctx, job = _prepare(state, values, mode)
    control.job_count, control.job_no = job.engine_jobs, 0
    with state.queue:
        state.start_job(f"scripts_{mode}", control)
        try:
            runner = Runner(ctx, control, job.engine_jobs)
            output = job.run(runner)
        finally:
            timestamp = state.job.timestamp
            state.end_job()
        generation.keep_overrides(state, values, ctx.options)
    response, records = build_response(ctx, output, timestamp, record_key)
    generation.deliver_records(state, records, runner.engine_seconds, user, task_id)
    log.info("script %r made %d image(s) in %d engine job(s), request %s as record %s", ctx.script.title,
             len(output.pictures), runner.done, request_id, record_key)
    return response


__all__ = ["SCRIPTS", "find_script", "scripts_list", "script_info", "prepare_script", "run_script"]
