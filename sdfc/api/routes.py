"""The `/sdapi/v1` blueprint: A1111 v1.10's route table (a1111-api.md §1.2), thin handlers.

Generation routes take the FIFO queue; progress, interrupt, skip, options and the list routes do not,
so they answer while a job runs.
"""
from __future__ import annotations

import base64
import json
import math
import re
import time

from flask import Blueprint, current_app, g, request

from ..engine import ModelNotFoundError
from ..engine import samplers as engine_samplers
from ..engine import schedules as engine_schedules
from .. import scripts as builtin_scripts
from . import auth, payloads
from .errors import ApiError, ValidationFailed, json_response
from .extras import run_extras_batch, run_extras_single, UPSCALERS
from ..engine.upscale import LATENT_UPSCALE_MODES
from .generation import apply_infotext, run_generation
from .images import ImageDecodeError, read_image_metadata
from .infotext import parse_generation_parameters
from .options import check_value
from .preview import preview_png
from .state import ApiState
from .styles import load_styles

bp = Blueprint("sdapi", __name__, url_prefix="/sdapi/v1")

NOT_SUPPORTED = {
    "interrogate": "interrogate (CLIP/DeepBooru captioning) is not supported by sdfc",
    "create/hypernetwork": "creating hypernetworks is not supported by sdfc",
    "train/hypernetwork": "training hypernetworks is not supported by sdfc",
    "server-kill": "server control routes are not available: FC manages instances",
    "server-restart": "server control routes are not available: FC manages instances",
    "server-stop": "server control routes are not available: FC manages instances",
}

def state() -> ApiState:
    return current_app.extensions["sdfc"]


# A1111 payloads nest a few levels (alwayson_scripts args); far deeper JSON only serves to exhaust the
# recursion limit of json.loads, of the response encoder or of any code walking the values.
MAX_JSON_DEPTH = 64
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class _NotCompliant(ValueError):
    """A JSON number that is not a finite float (NaN, Infinity, 1e999): valid for Python, not for JSON."""


def _no_constant(name: str):
    raise _NotCompliant(f"Out of range float values are not JSON compliant: {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotCompliant(f"Out of range float values are not JSON compliant: {text[:40]}")
    return value


def _body_error(msg: str, loc: list | None = None, kind: str = "value_error.jsondecode") -> ValidationFailed:
    return ValidationFailed([{"loc": ["body", *(loc or [])], "msg": msg, "type": kind}])


def _check_depth(body) -> None:
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _body_error(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        for child in (node.values() if isinstance(node, dict) else node):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def _surrogate_path(node, path=()):
    """The loc of the first string (or key) holding a lone UTF-16 surrogate, which UTF-8 cannot carry."""
    if isinstance(node, str):
        return path if _has_surrogate(node) else None
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        if isinstance(key, str) and _has_surrogate(key):
            return path + (_printable(key),)
        found = _surrogate_path(child, path + (_printable(key) if isinstance(key, str) else key,))
        if found is not None:
            return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")  # "\ud800" as its escape, not the char


def _check_surrogates(raw: bytes, body) -> None:
    # Lone surrogates arrive as \ud800 escapes or as raw surrogate bytes (json.loads decodes bytes with
    # surrogatepass); a prompt holding one fails in the tokenizer and cannot be echoed as UTF-8.
    try:
        raw.decode("utf-8")
        if not _SURROGATE_ESCAPE.search(raw):
            return
    except UnicodeDecodeError:
        pass
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        loc = _surrogate_path(body) or ()
        raise _body_error("string contains a lone UTF-16 surrogate", list(loc), "value_error.str.surrogate") from None


def body_json():
    """The request body as JSON, or FastAPI's 422 for malformed JSON.

    Stricter than Python's json module, as JSON itself is: NaN, Infinity and numbers beyond float range
    are refused anywhere in the body, and so are lone surrogates and nesting deeper than MAX_JSON_DEPTH.
    """
    if "sdfc_body" in g:
        return g.sdfc_body
    raw = request.get_data(cache=True)
    if not raw:
        raise ValidationFailed([{"loc": ["body"], "msg": "field required", "type": "value_error.missing"}])
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except _NotCompliant as exc:
        raise _body_error(str(exc)) from None
    except RecursionError:
        raise _body_error(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        pos = getattr(exc, "pos", 0)
        raise ValidationFailed([{"loc": ["body", pos], "msg": str(exc).split(":")[0],
                                 "type": "value_error.jsondecode",
                                 "ctx": {"msg": str(exc).split(":")[0], "pos": pos}}]) from None
    if isinstance(body, (dict, list)):
        _check_depth(body)
        _check_surrogates(raw, body)
    elif isinstance(body, str):
        _check_surrogates(raw, body)
    g.sdfc_body = body
    return body


def parse(model, body=None):
    values, errors = model.parse(body_json() if body is None else body)
    if errors:
        raise ValidationFailed(errors)
    return values


def generation_values(mode: str) -> dict:
    """The txt2img/img2img body, parsed and with its `infotext` applied (v1 routes and v2 task submits)."""
    model = payloads.TXT2IMG if mode == "txt2img" else payloads.IMG2IMG
    body = body_json()
    values = parse(model, body)
    if values.get("infotext"):
        # The infotext's values go through the same checks as the fields they fill.
        values = parse(model, apply_infotext(values, set(body)))
    g.log_extra = {"steps": values.get("steps"), "size": f"{values.get('width')}x{values.get('height')}"}
    return values


def _generate(mode: str):
    values = generation_values(mode)
    state().admit()
    jobs = current_app.extensions.get("sdfc.jobs")
    if values.get("force_task_id") and jobs is not None:
        # A1111's web UI names the job so that /internal/progress can follow it from any instance.
        status, body = jobs.run_inline(mode, values, auth.user_of())
        return json_response(body, status)
    with state().track():
        return json_response(run_generation(state(), values, mode, request_id=g.get("request_id"),
                                            user=auth.user_of()))


@bp.post("/txt2img")
def txt2img():
    return _generate("txt2img")


@bp.post("/img2img")
def img2img():
    return _generate("img2img")


@bp.post("/extra-single-image")
def extra_single_image():
    values = parse(payloads.EXTRAS_SINGLE)
    state().admit()
    with state().track(), state().queue:
        return json_response(run_extras_single(values))


@bp.post("/extra-batch-images")
def extra_batch_images():
    values = parse(payloads.EXTRAS_BATCH)
    state().admit()
    with state().track(), state().queue:
        return json_response(run_extras_batch(values, state().settings.max_images))


@bp.post("/png-info")
def png_info():
    values = parse(payloads.PNG_INFO)
    if not (values["image"] or "").strip():
        raise ApiError(400, "Invalid encoded image: the image is empty")
    try:
        info, items = read_image_metadata(values["image"])  # metadata only: no pixel is decoded
    except ImageDecodeError as exc:
        raise ApiError(400, f"Invalid encoded image: {exc}") from None
    info = info or ""
    return json_response({"info": info, "items": items,
                          "parameters": parse_generation_parameters(info) if info else {}})


def _preview(latent, factors) -> str | None:
    png = preview_png(latent, factors)
    return base64.b64encode(png).decode("ascii") if png is not None else None


@bp.get("/progress")
def progress():
    st = state()
    job = st.job
    skip_image = request.args.get("skip_current_image", "false").lower() in ("1", "true", "yes")
    idle_state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                  "job_count": 0, "job_timestamp": st.last_job_timestamp or "0", "job_no": 0,
                  "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return json_response({"progress": 0.0, "eta_relative": 0.0, "state": idle_state,
                              "current_image": None, "textinfo": None})
    c = job.control
    done = min(0.01 + c.progress, 1.0) if c.job_count else 0.01
    elapsed = time.time() - job.started
    options = st.options.snapshot()
    image = None if skip_image or not options["live_previews_enable"] else _preview(c.current_latent, c.preview_factors)
    return json_response({
        "progress": done, "eta_relative": elapsed / done - elapsed,
        "state": {"skipped": c.skipped, "interrupted": c.interrupted, "stopping_generation": False,
                  "job": job.name, "job_count": c.job_count, "job_timestamp": job.timestamp,
                  "job_no": c.job_no, "sampling_step": c.sampling_step, "sampling_steps": c.sampling_steps},
        "current_image": image, "textinfo": None,
    })


@bp.post("/interrupt")
def interrupt():
    job = state().job
    if job is not None:
        job.control.interrupt()
    return json_response({})


@bp.post("/skip")
def skip():
    job = state().job
    if job is not None:
        job.control.skip()
    return json_response(None)


@bp.get("/options")
def get_options():
    st = state()
    st.engine  # noqa: B018 - loads the model so that sd_model_checkpoint is known
    return json_response(st.options.snapshot())


@bp.post("/options")
def set_options():
    values = body_json()
    if not isinstance(values, dict):
        raise ValidationFailed([{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}])
    st = state()
    values = dict(values)
    checkpoint = check_value("sd_model_checkpoint", values.pop("sd_model_checkpoint", None))
    info = None
    if checkpoint:
        try:
            info = st.engine.find_model(checkpoint)
        except ModelNotFoundError as exc:
            raise ApiError(400, str(exc), error="RuntimeError") from None
    _check_clip_skip(st, info or st.engine.current, {**st.options.snapshot(), **values})
    st.options.update(values)  # every value is checked before any is stored
    if info is not None:
        with st.queue:  # as A1111: a model switch waits behind the running job
            st.engine.load(info.name)
            st.engine.current = info
            st.options.update(st.model_options())
    return json_response(None)


def _check_clip_skip(st: ApiState, model, merged: dict) -> None:
    """A stored clip skip the model lacks would fail every later job (per-job overrides fail only theirs)."""
    value = merged.get("CLIP_stop_at_last_layers")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value):
        problem = model.clip_skip_problem(int(value))
        if problem:
            raise ApiError(400, f"option CLIP_stop_at_last_layers: {problem}", error="ValueError")


@bp.get("/cmd-flags")
def cmd_flags():
    s = state().settings
    # Only what is safe to show: never credentials (A1111 leaks them here, issue #17411).
    return json_response({
        "api": True, "nowebui": False, "api_auth": None, "gradio_auth": None, "listen": None,
        "port": None, "ckpt_dir": str(s.models_dir), "cors_allow_origins": ",".join(s.cors_origins) or None,
        "device": s.device, "api_log": True, "no_half": True, "skip_torch_cuda_test": True,
    })


@bp.get("/samplers")
def samplers():
    return json_response([{"name": s.name, "aliases": list(s.aliases), "options": s.options}
                          for s in engine_samplers.SAMPLERS])


@bp.get("/schedulers")
def schedulers():
    rows = [{"name": "automatic", "label": engine_schedules.AUTOMATIC, "aliases": None, "default_rho": -1.0,
             "need_inner_model": False}]
    rows += [{"name": s.name, "label": s.label, "aliases": None, "default_rho": 7.0 if s.name == "karras" else -1.0,
              "need_inner_model": s.name == "uniform"} for s in engine_schedules.SCHEDULES]
    return json_response(rows)


@bp.get("/upscalers")
def upscalers():
    return json_response([{"name": name, "model_name": None, "model_path": None, "model_url": None,
                           "scale": 4.0} for name in UPSCALERS])


@bp.get("/sd-models")
def sd_models():
    return json_response([{"title": m.title, "model_name": m.name, "hash": m.short_hash, "sha256": m.sha256,
                           "filename": str(m.path), "config": None} for m in state().engine.available])


@bp.get("/prompt-styles")
def prompt_styles():
    return json_response(load_styles(state().settings.styles_file))


@bp.get("/embeddings")
def embeddings():
    db = state().engine.embeddings_of()
    return json_response({"loaded": {name: e.listing() for name, e in db.loaded.items()},
                          "skipped": {name: e.listing() for name, e in db.skipped.items()}})


@bp.get("/scripts")
def scripts():
    return json_response(builtin_scripts.scripts_list())


@bp.get("/script-info")
def script_info():
    return json_response(builtin_scripts.script_info())


@bp.get("/memory")
def memory():
    try:
        info = _meminfo()
        ram = {"free": info["MemAvailable"], "used": info["MemTotal"] - info["MemAvailable"],
               "total": info["MemTotal"]}
    except (OSError, KeyError) as exc:
        ram = {"error": str(exc)}
    return json_response({"ram": ram, "cuda": {"error": "unavailable"}})


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values


@bp.post("/refresh-checkpoints")
def refresh_checkpoints():
    state().engine.refresh()
    return json_response(None)


@bp.post("/refresh-embeddings")
def refresh_embeddings():
    with state().queue:  # between jobs: no job sees its token table change under it
        state().engine.refresh_embeddings()
    return json_response(None)


@bp.post("/create/embedding")
def create_embedding():
    from .training import create_embedding as create
    body = body_json()
    state().admit()  # it waits in the generation queue
    with state().track():
        return json_response(create(state(), body))


@bp.post("/train/embedding")
def train_embedding():
    """Synchronous, as A1111's: the answer comes when training ends (sdfc/api/training.py)."""
    from .training import train_embedding as train
    body = body_json()
    state().admit()  # it waits in the generation queue
    with state().track():
        return json_response(train(state(), body))


@bp.post("/refresh-loras")
def refresh_loras():
    state().engine.refresh_loras()
    return json_response(None)


@bp.get("/loras")
def loras():
    return json_response([f.listing() for f in state().engine.loras.files.values()])


@bp.post("/refresh-vae")
def refresh_noop():
    return json_response(None)


@bp.post("/unload-checkpoint")
def unload_checkpoint():
    with state().queue:
        state().engine.unload()
    return json_response({})


@bp.post("/reload-checkpoint")
def reload_checkpoint():
    with state().queue:
        state().engine.load()
    return json_response({})


@bp.get("/latent-upscale-modes")
def latent_upscale_modes():
    return json_response([{"name": name} for name in LATENT_UPSCALE_MODES])


# Lists of things sdfc has none of (no separate VAEs, hypernetworks, face restorers or extensions yet):
# A1111's shape, empty.
EMPTY_LISTS = ("sd-vae", "hypernetworks", "face-restorers", "realesrgan-models", "extensions")


def _empty_list():
    return json_response([])


for _route in EMPTY_LISTS:
    bp.add_url_rule(f"/{_route}", endpoint=_route.replace("-", "_"), view_func=_empty_list, methods=["GET"])


def _not_supported(route: str):
    def handler():
        raise ApiError(501, NOT_SUPPORTED[route], error="NotImplementedError")
    handler.__name__ = "not_supported_" + route.replace("/", "_").replace("-", "_")
    return handler


for _route in NOT_SUPPORTED:
    bp.add_url_rule(f"/{_route}", view_func=_not_supported(_route), methods=["POST"])

