"""`/openapi.json` generated from the request models and the route table; Swagger UI at `/docs`.

The document states every status a route answers, each with its body schema, so that a client (or
schemathesis, tests/test_schemathesis.py) can rely on it: 200 shapes per route, A1111's error shape
`{error, detail, body, errors}` for 400/404/409/413/501/503, FastAPI's `{"detail": [...]}` for 422 and 401
for the Basic scheme. Values that depend on this server (its limits, samplers, schedules, upscalers, styles)
are taken from the running app, so the bounds the document gives are the ones the server enforces.

The Swagger UI assets come from the `swagger-ui-bundle` package (no CDN: FC functions and offline
laptops load the page all the same).
"""
from __future__ import annotations

import copy
import math
import re

from flask import Blueprint, current_app, send_from_directory

from ..engine import samplers as engine_samplers
from ..jobs.schema import STATUSES as TASK_STATUSES
from ..jobs.schema import TYPES as TASK_TYPES
from ..engine import schedules as engine_schedules
from . import payloads
from .errors import json_response
from ..engine.hires import DEFAULT_DENOISING_STRENGTH, SAME_SAMPLER, SAME_SCHEDULER
from ..engine.upscale import LATENT_UPSCALE_MODES
from .extras import UPSCALERS
from .generation import UNSUPPORTED_FLAGS
from .img2img import IMAGE_CFG_SCALE_DEFAULT
from .options import CHOICES, DEFAULTS, NUMBERS
from .styles import load_styles
from ..jobs.training_requests import TRAIN_EMBEDDING, TRAIN_LORA
from .training import CREATE_EMBEDDING, TRAIN_EMBEDDING_V1

bp = Blueprint("docs", __name__)

REQUEST_MODELS = {
    "/sdapi/v1/txt2img": payloads.TXT2IMG,
    "/sdapi/v1/img2img": payloads.IMG2IMG,
    "/sdapi/v2/tasks/txt2img": payloads.TXT2IMG,
    "/sdapi/v2/tasks/img2img": payloads.IMG2IMG,
    "/sdapi/v2/tasks/train-lora": TRAIN_LORA,
    "/sdapi/v2/tasks/train-embedding": TRAIN_EMBEDDING,
    "/sdapi/v1/create/embedding": CREATE_EMBEDDING,
    "/sdapi/v1/train/embedding": TRAIN_EMBEDDING_V1,
    "/sdapi/v1/extra-single-image": payloads.EXTRAS_SINGLE,
    "/sdapi/v1/extra-batch-images": payloads.EXTRAS_BATCH,
    "/sdapi/v1/png-info": payloads.PNG_INFO,
    "/sdapi/v1/interrogate": payloads.INTERROGATE,
}

SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sdfc - Swagger UI</title>
<link rel="stylesheet" href="/static/swagger/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/static/swagger/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""

# ---------------------------------------------------------------------------------------------
# Schemas (OpenAPI 3.0: `nullable` marks a value that may be null)
# ---------------------------------------------------------------------------------------------

_S, _I, _N, _B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
_OBJ = {"type": "object"}
_NULL = {"nullable": True, "enum": [None], "description": "null"}
_EMPTY = {"type": "object", "maxProperties": 0}


def _nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


def _obj(props: dict, required: bool = True, **extra) -> dict:
    out = {"type": "object", "properties": props, **extra}
    if required:
        out["required"] = list(props)
    return out


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(items: dict, **extra) -> dict:
    return {"type": "array", "items": items, **extra}


COMPONENTS = {
    "HTTPError": _obj({"error": _S, "detail": _S, "body": _S, "errors": _S}, title="HTTPError",
                      description="A1111's error shape"),
    "ValidationError": {"title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
                        "properties": {"loc": _array({"anyOf": [_S, _I]}), "msg": _S, "type": _S, "ctx": _OBJ}},
    "HTTPValidationError": _obj({"detail": _array(_ref("ValidationError"))}, title="HTTPValidationError",
                                description="FastAPI's request validation error"),
    "NotFound": _obj({"detail": _S}, title="NotFound", description="FastAPI's 404 for an unknown path"),
    "GenerationResponse": _obj({"images": _array(_S, description="base64 PNG/JPEG/WebP"),
                                "parameters": _OBJ, "info": _S}, title="GenerationResponse"),
    "ExtrasSingleImageResponse": _obj({"html_info": _S, "image": _S}, title="ExtrasSingleImageResponse"),
    "ExtrasBatchImagesResponse": _obj({"html_info": _S, "images": _array(_S)}, title="ExtrasBatchImagesResponse"),
    "PNGInfoResponse": _obj({"info": _S, "items": _OBJ, "parameters": _OBJ}, title="PNGInfoResponse"),
    "ProgressResponse": _obj({
        "progress": _N, "eta_relative": _N,
        "state": _obj({"skipped": _B, "interrupted": _B, "stopping_generation": _B, "job": _S, "job_count": _I,
                       "job_timestamp": _S, "job_no": _I, "sampling_step": _I, "sampling_steps": _I}),
        "current_image": _nullable(_S), "textinfo": _nullable(_S)}, title="ProgressResponse"),
    "GalleryItem": _obj({
        "id": _I, "request_id": _nullable(_S), "image_index": _nullable(_I), "created_at": _nullable(_S),
        "prompt": _nullable(_S), "negative_prompt": _nullable(_S), "steps": _nullable({}),
        "seed": _nullable({}), "sampler": _nullable(_S), "cfg_scale": _nullable({}), "size": _nullable(_S),
        "model_hash": _nullable(_S), "model": _nullable(_S), "image_format": _S, "image_url": _S,
        "infotext": _nullable(_S), "image_base64": _S, "user": _nullable(_S), "task_id": _nullable(_S),
        "gpu_seconds": _nullable(_N), "cost": _nullable(_N)},
        required=False, title="GalleryItem"),
    # /gallery/api/usage: sums over the images the caller may see (sdfc/records/gallery.py).
    "UsageSums": _obj({"images": _I, "gpu_seconds": _N, "cost": _N}, title="UsageSums"),
    "Usage": _obj({
        "total": _ref("UsageSums"),
        "by_day": _array({"allOf": [_ref("UsageSums"), _obj({"day": _nullable(_S)})]}),
        "by_model": _array({"allOf": [_ref("UsageSums"), _obj({"model": _nullable(_S)})]}),
        "by_user": _array({"allOf": [_ref("UsageSums"), _obj({"user": _nullable(_S)})]}),
        "currency": _S}, title="Usage"),
    "GalleryPage": _obj({"items": _array(_ref("GalleryItem")), "page": _I, "page_size": _I, "total": _I,
                         "pages": _I}, title="GalleryPage"),
    # sdfc/jobs/api.py's task_view: times are ISO 8601 (UTC), null until they happen.
    "TaskSubmitted": _obj({"task_id": _S, "status": {"type": "string", "enum": list(TASK_STATUSES)}},
                          title="TaskSubmitted"),
    "Task": _obj({
        "task_id": _S, "type": {"type": "string", "enum": list(TASK_TYPES)},
        "status": {"type": "string", "enum": list(TASK_STATUSES)},
        "progress": {"type": "number", "minimum": 0}, "step": _I, "steps": _I, "eta": _nullable(_N),
        "created_at": _nullable(_S), "started_at": _nullable(_S), "finished_at": _nullable(_S),
        "error": _nullable(_S), "user": _nullable(_S), "gpu_seconds": _nullable(_N), "cost": _nullable(_N),
        "loss": _nullable(_N)}, title="Task"),
    # sdfc/jobs/training_process.py's result: the LoRA (or embedding) written, its file in its folder; none when cancelled.
    "TrainingResult": _obj({"lora": _nullable(_S), "embedding": _nullable(_S), "file": _nullable(_S),
                            "steps_done": _I, "steps": _I, "final_loss": _nullable(_N), "cancelled": _B, "seed": _I,
                            "metadata": {"type": "object", "additionalProperties": _S}}, title="TrainingResult"),
    "TaskPage": _obj({"tasks": _array(_ref("Task")), "total": _I, "page": _I, "page_size": _I}, title="TaskPage"),
    # A1111 1.10's ProgressRequest/ProgressResponse (modules/progress.py), answered from the task store.
    "ProgressRequest": {"title": "ProgressRequest", "type": "object", "required": ["id_task"],
                        "properties": {"id_task": _S,
                                       "id_live_preview": {"type": "integer", "description":
                                                           "the id of the preview the client has (-1: none)"},
                                       "live_preview": {"description": "false: leave the preview out"}}},
    "InternalProgress": _obj({"active": _B, "queued": _B, "completed": _B, "progress": _nullable(_N),
                              "eta": _nullable(_N), "live_preview": _nullable(_S), "id_live_preview": _I,
                              "textinfo": _nullable(_S)}, title="InternalProgress"),
    "PendingTasks": _obj({"size": _I, "tasks": _array(_S)}, title="PendingTasks"),
}

_LIST_ROUTES = ("sd-vae", "hypernetworks", "face-restorers", "realesrgan-models",
                "loras", "extensions")

# 200 bodies per route; routes not listed answer a JSON value of any shape.
SUCCESS = {
    "/sdapi/v1/txt2img": _ref("GenerationResponse"),
    "/sdapi/v1/img2img": _ref("GenerationResponse"),
    "/sdapi/v1/extra-single-image": _ref("ExtrasSingleImageResponse"),
    "/sdapi/v1/extra-batch-images": _ref("ExtrasBatchImagesResponse"),
    "/sdapi/v1/png-info": _ref("PNGInfoResponse"),
    "/sdapi/v1/progress": _ref("ProgressResponse"),
    "/sdapi/v1/interrupt": _EMPTY,
    "/sdapi/v1/skip": _NULL,
    "GET /sdapi/v1/options": _ref("Options"),
    "POST /sdapi/v1/options": _NULL,
    "/sdapi/v1/cmd-flags": _OBJ,
    "/sdapi/v1/samplers": _array(_obj({"name": _S, "aliases": _array(_S), "options": {
        "type": "object", "additionalProperties": _S}})),
    "/sdapi/v1/schedulers": _array(_obj({"name": _S, "label": _S, "aliases": _nullable(_array(_S)),
                                          "default_rho": _N, "need_inner_model": _B})),
    "/sdapi/v1/upscalers": _array(_obj({"name": _S, "model_name": _nullable(_S), "model_path": _nullable(_S),
                                         "model_url": _nullable(_S), "scale": _N})),
    "/sdapi/v1/latent-upscale-modes": _array(_obj({"name": {"type": "string", "enum": list(LATENT_UPSCALE_MODES)}})),
    "/sdapi/v1/sd-models": _array(_obj({"title": _S, "model_name": _S, "hash": _nullable(_S),
                                         "sha256": _nullable(_S), "filename": _S, "config": _nullable(_S)})),
    "/sdapi/v1/prompt-styles": _array(_obj({"name": _S, "prompt": _S, "negative_prompt": _S})),
    "/sdapi/v1/embeddings": _obj({"loaded": _OBJ, "skipped": _OBJ}),
    "/sdapi/v1/scripts": _obj({"txt2img": _array(_S), "img2img": _array(_S)}),
    # A1111's ScriptInfo per built-in script (sdfc/scripts), an arg per UI component of its script_args.
    "/sdapi/v1/script-info": _array(_obj({"name": _S, "is_alwayson": _B, "is_img2img": _B, "args": _array(_obj(
        {"label": _S, "value": {}, "minimum": {}, "maximum": {}, "step": {},
         "choices": {"nullable": True, "type": "array"}}))})),
    "/sdapi/v1/memory": _obj({"ram": _OBJ, "cuda": _OBJ}),
    "/sdapi/v1/refresh-checkpoints": _NULL,
    "/sdapi/v1/refresh-vae": _NULL,
    "/sdapi/v1/refresh-embeddings": _NULL,
    "/sdapi/v1/refresh-loras": _NULL,
    # A1111's CreateResponse / TrainResponse (sdfc/api/training.py)
    "/sdapi/v1/create/embedding": _obj({"info": _S}, title="CreateResponse"),
    "/sdapi/v1/train/embedding": _obj({"info": _S}, title="TrainResponse"),
    "/sdapi/v1/unload-checkpoint": _EMPTY,
    "/sdapi/v1/reload-checkpoint": _EMPTY,
    **{f"/sdapi/v1/{name}": _array({}, maxItems=0) for name in _LIST_ROUTES},
    "/gallery/api/images": _ref("GalleryPage"),
    "/gallery/api/images/{raw}": _ref("GalleryItem"),
    "/gallery/api/models": _obj({"models": _array(_S)}),
    "/gallery/api/usage": _ref("Usage"),
    "/sdapi/v2/tasks/txt2img": _ref("TaskSubmitted"),
    "/sdapi/v2/tasks/img2img": _ref("TaskSubmitted"),
    "/sdapi/v2/tasks/{task_id}": _ref("Task"),
    "/sdapi/v2/tasks/train-lora": _ref("TaskSubmitted"),
    "/sdapi/v2/tasks/train-embedding": _ref("TaskSubmitted"),
    "/sdapi/v2/tasks/{task_id}/result": {"anyOf": [_ref("GenerationResponse"), _ref("TrainingResult")]},
    "/sdapi/v2/tasks": _ref("TaskPage"),
    "/internal/progress": _ref("InternalProgress"),
    "/internal/pending-tasks": _ref("PendingTasks"),
}
# Routes whose success is not 200.
SUCCESS_STATUS = {"/sdapi/v2/tasks/txt2img": "202", "/sdapi/v2/tasks/img2img": "202",
                  "/sdapi/v2/tasks/train-lora": "202", "/sdapi/v2/tasks/train-embedding": "202"}
_TASK_SUBMIT_ERRORS = {"400": "a value the server cannot use (as the v1 route), or a malformed Idempotency-Key",
                       "409": "force_task_id names a task that already exists"}
_TRAINING_ERRORS = {"400": "a base folder that is no diffusers model, an images folder without images (or over "
                           "the image limit), or a malformed Idempotency-Key",
                    "404": "base or images names no folder inside the training-data folder",
                    "409": "a file of that name exists (overwrite: false), or force_task_id is taken"}

# Statuses beyond 200/401/413/422/503 per route (every route may answer 503 while the server drains).
ERRORS = {
    "/sdapi/v1/txt2img": {"400": "a value the server cannot use (size, limit, sampler, style, prompt)",
                          "409": "force_task_id names a task that already exists"},
    "/sdapi/v1/img2img": {"400": "a value the server cannot use (size, limit, image, sampler, style, prompt)",
                          "404": "no init image was sent",
                          "409": "force_task_id names a task that already exists"},
    "/sdapi/v1/extra-single-image": {"400": "an image that cannot be decoded or a size over the limits",
                                     "404": "no image was sent"},
    "/sdapi/v1/extra-batch-images": {"400": "an image that cannot be decoded or a size over the limits"},
    "/sdapi/v1/png-info": {"400": "an image that cannot be decoded"},
    "POST /sdapi/v1/options": {"400": "an unknown option, a value of the wrong type or range, an unknown model"},
    "/gallery/api/images": {"400": "a malformed query parameter"},
    "/gallery/api/usage": {"400": "a malformed query parameter"},
    "/gallery/api/images/{raw}": {"404": "no image with that id"},
    "/gallery/api/images/{raw}/image.png": {"404": "no image with that id"},
    "/sdapi/v2/tasks/txt2img": _TASK_SUBMIT_ERRORS,
    "/sdapi/v2/tasks/img2img": {**_TASK_SUBMIT_ERRORS, "404": "no init image was sent"},
    "/sdapi/v2/tasks/train-lora": _TRAINING_ERRORS,
    "/sdapi/v2/tasks/train-embedding": _TRAINING_ERRORS,
    "/sdapi/v1/create/embedding": {"503": "no embeddings folder is configured"},
    "/sdapi/v1/train/embedding": {
        "400": "a base folder that is no diffusers model, or a data_root without images (or over the limit)",
        "404": "base or data_root names no folder inside the training-data folder, or embedding_name no "
               "loaded embedding",
        "501": "this instance has no torch (the serving image): train with the task route's training function"},
    "/sdapi/v2/tasks/{task_id}": {"404": "no such task (or another user's)"},
    "/sdapi/v2/tasks/{task_id}/result": {
        "400": "the task failed on a value the server could not use (the v1 route's 400)",
        "404": "no such task (or another user's), or the v1 route's 404",
        "409": "the task is queued or running: its result is not ready",
        "410": "the task was cancelled before it produced a result",
        "500": "the task failed (its instance died, or the engine failed)"},
    "/sdapi/v2/tasks": {"400": "an unknown status, or page/page_size out of range"},
}
NOT_IMPLEMENTED = "not supported by sdfc (A1111 routes sdfc does not implement)"


def _json_content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _error_response(description: str) -> dict:
    return {"description": description, "content": _json_content(_ref("HTTPError"))}


def _responses(key: str, path: str, method: str, not_implemented: bool) -> dict:
    if not_implemented:
        success = None
    elif path.endswith("/image.png"):
        success = {"description": "The image as a PNG carrying its infotext",
                   "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
    else:
        schema = SUCCESS.get(key, SUCCESS.get(path, {}))
        success = {"description": "Successful Response", "content": _json_content(schema)}
    out = {SUCCESS_STATUS.get(path, "200"): success} if success else {}
    extra = ERRORS.get(key, ERRORS.get(path, {}))
    out.update({code: _error_response(text) for code, text in extra.items()})
    if not_implemented:
        out["501"] = _error_response(NOT_IMPLEMENTED)
    out["401"] = {"description": "Not authenticated (HTTP Basic)",
                  "headers": {"WWW-Authenticate": {"schema": _S}},
                  "content": _json_content({"anyOf": [_ref("HTTPError"), _ref("NotFound")]})}
    if method == "POST":
        out["413"] = _error_response("request body over SDFC_MAX_BODY_BYTES")
    # 422: FastAPI's validation list, or A1111's shape for what A1111 itself answers 422 (unknown script).
    out["422"] = {"description": "Validation Error",
                  "content": _json_content({"anyOf": [_ref("HTTPValidationError"), _ref("HTTPError")]})}
    out["503"] = {"description": "Shutting down, out of memory for this job, or the records database is "
                                 "not answering: retry later",
                  "headers": {"Retry-After": {"schema": _S}},
                  "content": _json_content(_ref("HTTPError"))}
    return out


# ---------------------------------------------------------------------------------------------
# Request bodies: the models' schemas with this server's limits and names
# ---------------------------------------------------------------------------------------------

SIZE_FIELDS = ("width", "height")
SAMPLER_FIELDS = ("sampler_name", "sampler_index")
SCHEDULER_FIELDS = ("scheduler",)
UPSCALER_FIELDS = ("upscaler_1", "upscaler_2")


def _sampler_names() -> list[str]:
    return sorted({name for s in engine_samplers.SAMPLERS for name in (s.name, *s.aliases)})


def _schedule_names() -> list[str]:
    return sorted({engine_schedules.AUTOMATIC, "automatic",
                   *(n for s in engine_schedules.SCHEDULES for n in (s.name, s.label))})


def _limit(prop: dict, key: str, value) -> None:
    """Tighten `minimum`/`maximum` in place (never loosen what the model declares)."""
    if value is None:
        return
    current = prop.get(key)
    if current is None or (value < current if key == "maximum" else value > current):
        prop[key] = value


def _models(settings) -> list:
    """The models this server can load ([] where it has none: the web function)."""
    from ..engine import ModelNotFoundError
    from ..engine.models import scan_models

    try:
        return scan_models(settings.models_dir)
    except (OSError, ValueError, ModelNotFoundError):
        return []


def _model_names(models: list) -> list[str]:
    """Every spelling a request may name a model by (ModelInfo.matches): name, title, short hash, sha256."""
    return sorted({n for m in models for n in (m.name, m.title, m.short_hash, m.sha256) if n})


def _size_step(settings) -> int:
    """The size step every available model accepts (their least common multiple; 8 with no model)."""
    from .generation import size_step

    step = 8
    for info in _models(settings):
        step = math.lcm(step, size_step(str(info.path)))
    return step


def _only_empty(prop: dict, what: str) -> None:
    prop.pop("anyOf", None)  # a number would be coerced to a non-empty string
    prop["type"] = "string"
    prop["maxLength"] = 0
    prop["description"] = f"{what} (must be empty or null)"


def _false_values() -> dict:
    """What the request parser reads as false (schema.py's coercions): false, 0, null or a false word."""
    from .schema import _FALSE
    words = "|".join("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in w) for w in sorted(_FALSE))
    return {"anyOf": [{"enum": [False, 0, None], "nullable": True},
                      {"type": "string", "pattern": rf"^\s*({words})\s*$"}]}


def _describe_hires(schema: dict) -> None:
    """The hr_* fields are read only with enable_hr: their names are checked then (and ignored otherwise)."""
    props = schema["properties"]
    names = {
        "hr_upscaler": [*LATENT_UPSCALE_MODES, *UPSCALERS, None],
        "hr_sampler_name": [*_sampler_names(), SAME_SAMPLER, "", None],
        "hr_scheduler": [*_schedule_names(), SAME_SCHEDULER, "", None],
        "hr_checkpoint_name": ["Use same checkpoint", "", None],
        "firstphase_width": [0, None], "firstphase_height": [0, None],
    }
    hires = {"properties": {name: {"enum": values, "nullable": True} for name, values in names.items()}}
    schema.setdefault("allOf", []).append({"anyOf": [{"properties": {"enable_hr": _false_values()}}, hires]})
    props["enable_hr"]["description"] = (
        "hires fix: a second pass (img2img from the upscaled first pass) at hr_scale × width/height, or at "
        "hr_resize_x/y (both given: scaled to cover, then centre-cropped); that final size must be a multiple "
        "of the model's size step and within SDFC_MAX_PIXELS and the memory budget (400 otherwise)")
    props["hr_upscaler"]["description"] = ("null: Latent. Latent modes interpolate the latents; None/Lanczos/"
                                           "Nearest resize the decoded image (its target size must be a multiple "
                                           "of 8). Model upscalers (ESRGAN...) need weights sdfc lacks: 400")
    props["hr_second_pass_steps"]["description"] = "0: steps; the second pass runs exactly this many steps"
    props["hr_sampler_name"]["description"] = "null: the first pass's sampler"
    props["hr_scheduler"]["description"] = "null: the first pass's schedule"
    props["hr_checkpoint_name"]["description"] = "another model for the second pass is not supported"
    for name in ("firstphase_width", "firstphase_height"):
        props[name]["description"] = "the legacy hires fix is not supported: 0"
    props["denoising_strength"]["description"] = (
        f"hires fix: the second pass's strength (null: {DEFAULT_DENOISING_STRENGTH}, where A1111 fails); "
        "0 returns the upscaled first pass")


def _with_server_limits(schema: dict, settings) -> dict:
    """The model's schema with what this server accepts: its limits, names, and what sdfc does not support."""
    schema = copy.deepcopy(schema)
    props = schema["properties"]
    for name in UNSUPPORTED_FLAGS:
        if name in props:
            props[name]["enum"] = [False, None]
            props[name]["description"] = UNSUPPORTED_FLAGS[name] + " (false or null)"
    if "script_name" in props:
        _only_empty(props["script_name"], "sdfc has no scripts")
    if "alwayson_scripts" in props:
        props["alwayson_scripts"]["maxProperties"] = 0
        props["alwayson_scripts"]["description"] = "sdfc has no scripts (must be empty)"
    if schema.get("title") == payloads.IMG2IMG.name:
        props["mask"]["description"] = "inpainting mask, base64 or data-URI image: white is repainted"
        props["resize_mode"]["description"] = ("0 just resize, 1 crop and resize, 2 resize and fill, "
                                               "3 just resize (latent upscale; with a mask, or on an inpainting "
                                               "model, the init images must have the job's size unless "
                                               "inpaint_full_res)")
        props["image_cfg_scale"]["enum"] = [None, IMAGE_CFG_SCALE_DEFAULT]
        props["image_cfg_scale"]["description"] = ("only instruct-pix2pix (edit) models use it; sdfc serves none "
                                                   f"(null, or A1111's default {IMAGE_CFG_SCALE_DEFAULT})")
        props["latent_mask"]["description"] = ("base64 or data-URI image replacing the mask for the masked-content "
                                               "fill (then of the job's size) and the latent blend (A1111's "
                                               "p.latent_mask); only with a mask")
        props["inpainting_fill"]["description"] = "masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing"
        props["inpaint_full_res"]["description"] = "true: inpaint only the masked area (cropped, then pasted back)"
    if "imageList" in props:
        props["imageList"]["maxItems"] = settings.max_images
        props["imageList"]["description"] = (f"[{{data: base64 image, name}}], at most {settings.max_images} "
                                             "(SDFC_MAX_IMAGES)")
    if "styles" in props:
        names = [s["name"] for s in load_styles(settings.styles_file)]
        props["styles"]["items"] = {"type": "string", "enum": names} if names else {"type": "string"}
        if not names:
            props["styles"]["maxItems"] = 0
        props["styles"]["description"] = "names from GET /prompt-styles"
    for name in SAMPLER_FIELDS:
        if name in props and name != "sampler_index":
            props[name]["enum"] = _sampler_names() + ([None] if props[name].get("nullable") else [])
            props[name]["description"] = "a sampler name or alias (case-insensitive); see GET /samplers"
    if "sampler_index" in props:
        # As A1111: sampler_index is read (and checked) only when sampler_name is empty or null.
        props["sampler_name"]["enum"].append("")
        props["sampler_index"]["description"] = "legacy sampler field: a sampler name, used (and checked) " \
                                                "only when sampler_name is empty or null"
        schema["anyOf"] = [
            {"required": ["sampler_name"], "properties": {"sampler_name": {"enum": _sampler_names()}}},
            {"properties": {"sampler_index": {"enum": [*_sampler_names(), None]}}}]
    if "enable_hr" in props:
        _describe_hires(schema)
    if "refiner_checkpoint" in props:
        from ..engine.sdxl import NO_REFINER

        models = _models(settings)
        props["refiner_checkpoint"].pop("anyOf", None)
        props["refiner_checkpoint"]["enum"] = [*_model_names(models), *sorted(n for n in NO_REFINER if n is not None),
                                               None]
        props["refiner_checkpoint"]["nullable"] = True
        props["refiner_checkpoint"]["description"] += " (a title, name or hash from GET /sd-models)"
        if "enable_hr" in props:  # a refiner with the hires fix is refused (engine/sdxl.py)
            no_refiner = {"properties": {"refiner_checkpoint": {"enum": list(NO_REFINER), "nullable": True}}}
            schema.setdefault("allOf", []).append(
                {"anyOf": [no_refiner, {"properties": {"enable_hr": _false_values()}}]})
    if schema.get("title") == payloads.IMG2IMG.name:
        props["denoising_strength"]["description"] = (
            "with a timestep sampler (DDIM, PLMS, UniPC...) int(min(denoising_strength, 0.999) × steps) must "
            "be at least 1 (400 otherwise)")
    for name in SCHEDULER_FIELDS:
        if name in props:
            props[name]["enum"] = _schedule_names() + ([None] if props[name].get("nullable") else [])
    for name in UPSCALER_FIELDS:
        if name in props:
            props[name]["enum"] = list(UPSCALERS) + ([None] if props[name].get("nullable") else [])
    # SDFC_MAX_STEPS and SDFC_MAX_IMAGES bound generations; training requests carry theirs (training_requests.py)
    generation = schema.get("title") not in (TRAIN_LORA.name, TRAIN_EMBEDDING.name, TRAIN_EMBEDDING_V1.name)
    if "steps" in props and generation:
        _limit(props["steps"], "maximum", settings.max_steps)
    for name in ("batch_size", "n_iter"):
        if name in props and generation:
            _limit(props[name], "maximum", settings.max_images)
            props[name]["description"] = f"batch_size × n_iter is at most {settings.max_images} (SDFC_MAX_IMAGES)"
    step = _size_step(settings)
    for name in SIZE_FIELDS:
        if name in props:
            props[name]["multipleOf"] = step
            _limit(props[name], "minimum", step)
            if settings.max_pixels:
                props[name]["description"] = (f"{props[name].get('description', '')}; width × height is at most "
                                              f"{settings.max_pixels} pixels (SDFC_MAX_PIXELS)").lstrip("; ")
    return schema


def _options_schema(settings, *, for_request: bool) -> dict:
    """POST /options takes an object of option values (unknown keys are a 400); GET answers all of them."""
    props = {}
    models = _models(settings)
    for key, default in DEFAULTS.items():
        if key in CHOICES:
            prop = {"type": "string", "enum": list(CHOICES[key])}
        elif key in NUMBERS:
            spec = NUMBERS[key]
            low, high, integer = spec if isinstance(spec, tuple) else (None, None, False)
            # GET answers A1111's float for an option whose default is a float (CLIP_stop_at_last_layers: 1.0).
            prop = {"type": "integer" if integer and for_request else "number"}
            if low is not None:
                prop["minimum"] = low
            if high is not None:
                prop["maximum"] = high
        elif isinstance(default, bool):
            prop = dict(_B)
        elif isinstance(default, (int, float)):
            prop = dict(_N)
        elif default is None:
            prop = _nullable(_S)
        else:
            prop = dict(_S)
        if default is not None:
            prop["default"] = default
        props[key] = prop
    if models:
        _model_dependent_options(props, models, for_request)
    schema = {"title": "Options", "type": "object", "properties": props}
    if for_request:
        schema["title"] = "OptionsUpdate"
        schema["additionalProperties"] = False
        schema["description"] = ("Option values to set; unknown options and values outside an option's type "
                                 "or range are refused (400) and nothing is stored. sd_model_checkpoint "
                                 "switches the model (a title from GET /sd-models).")
    return schema


def _model_dependent_options(props: dict, models: list, for_request: bool) -> None:
    """What POST /options checks against the models (routes.set_options): the clip skips a model exports
    and the names a checkpoint is selected by. A clip skip is documented when every model has it, so that it
    is valid whichever model the same request selects (with one model: exactly the ones it has)."""
    skips = set.intersection(*(set(dict(m.clip_skip_outputs)) for m in models))
    clip = props["CLIP_stop_at_last_layers"]
    clip["enum"] = sorted(skips)
    clip["description"] = "the clip skips the models export (GET /sd-models; A1111's range is 1-12)"
    if for_request:
        props["sd_model_checkpoint"]["enum"] = [*_model_names(models), "", None]
        props["sd_model_checkpoint"]["description"] = ("a model's title, name or hash from GET /sd-models "
                                                       "(empty or null: keep the current one)")


# ---------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------

_CONVERTER = re.compile(r"<(?:(\w+):)?(\w+)>")
DOCUMENTED_PREFIXES = ("/sdapi/v1/", "/sdapi/v2/", "/gallery/api/", "/internal/")


def _openapi_path(rule) -> tuple[str, list[dict]]:
    params = []

    def replace(match):
        converter, name = match.group(1) or "string", match.group(2)
        schema = {"type": "integer"} if converter == "int" else {"type": "string"}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
        return "{" + name + "}"

    return _CONVERTER.sub(replace, rule.rule), params


# An empty value is no filter (as an HTML form sends it).
_DATE_OR_TIME = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"},
                           {"type": "string", "maxLength": 0}]}
GALLERY_QUERY = [
    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10 ** 6}},
    {"name": "page_size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "q", "in": "query", "schema": _S, "description": "prompt text"},
    {"name": "model", "in": "query", "schema": _S},
    {"name": "since", "in": "query", "schema": _DATE_OR_TIME, "description": "YYYY-MM-DD or an ISO 8601 time (UTC)"},
    {"name": "until", "in": "query", "schema": _DATE_OR_TIME,
     "description": "YYYY-MM-DD (that whole day) or an ISO 8601 time"},
]
USER_QUERY = {"name": "user", "in": "query", "schema": _S,
              "description": "admins (SDFC_ADMINS): only this user's images; ignored for others"}
_EMPTY_STRING = {"type": "string", "maxLength": 0}
TASK_QUERY = [
    {"name": "status", "in": "query", "schema": {"type": "string", "enum": [*TASK_STATUSES, ""]},
     "description": "only tasks in this status (empty: all)"},
    {"name": "page", "in": "query",
     "schema": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 10 ** 6}, _EMPTY_STRING]}},
    {"name": "page_size", "in": "query",
     "schema": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 100}, _EMPTY_STRING]}},
]
IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "required": False,
                      "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                      "description": "a retried submit with the same key answers the task it created"}
QUERY = {
    "/sdapi/v2/tasks": TASK_QUERY,
    "/sdapi/v2/tasks/txt2img": [IDEMPOTENCY_HEADER],
    "/sdapi/v2/tasks/img2img": [IDEMPOTENCY_HEADER],
    "/sdapi/v2/tasks/train-lora": [IDEMPOTENCY_HEADER],
    "/sdapi/v2/tasks/train-embedding": [IDEMPOTENCY_HEADER],
    "/sdapi/v1/progress": [{"name": "skip_current_image", "in": "query", "schema": _S,
                            "description": "1, true or yes: leave current_image out (anything else: false)"}],
    "/gallery/api/images": GALLERY_QUERY + [USER_QUERY],
    "/gallery/api/usage": [q for q in GALLERY_QUERY if q["name"] in ("since", "until")] + [USER_QUERY],
    "/gallery/api/images/{raw}": [{"name": "include", "in": "query", "schema": _S,
                                   "description": "`image` adds image_base64"}],
}


def build_openapi(app) -> dict:
    settings = app.extensions["sdfc"].settings
    paths: dict = {}
    schemas = copy.deepcopy(COMPONENTS)
    schemas["Options"] = _options_schema(settings, for_request=False)
    schemas["OptionsUpdate"] = _options_schema(settings, for_request=True)
    security = [{"HTTPBasic": []}]
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith(DOCUMENTED_PREFIXES):
            continue
        path, path_params = _openapi_path(rule)
        not_implemented = rule.endpoint.startswith("sdapi.not_supported_")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            key = f"{method} {path}"
            op = {"summary": path.rsplit("/", 1)[-1].replace("-", " ").capitalize(),
                  "operationId": f"{rule.endpoint.replace('.', '_')}_{method.lower()}", "security": security,
                  "responses": _responses(key, path, method, not_implemented)}
            params = path_params + QUERY.get(path, [])
            if params:
                op["parameters"] = params
            model = REQUEST_MODELS.get(path)
            if model is not None and method == "POST" and not not_implemented:
                schemas[model.name] = _with_server_limits(model.json_schema(), settings)
                op["requestBody"] = {"required": True, "content": _json_content(_ref(model.name))}
            elif key == "POST /sdapi/v1/options":
                op["requestBody"] = {"required": True, "content": _json_content(_ref("OptionsUpdate"))}
            elif key == "POST /internal/progress":
                op["requestBody"] = {"required": True, "content": _json_content(_ref("ProgressRequest"))}
            paths.setdefault(path, {})[method.lower()] = op
    _add_shadowed_methods(app, paths, security)
    return {"openapi": "3.0.2", "info": {"title": "sdfc", "version": "1.10.1",
                                         "description": "A1111-compatible Stable Diffusion API on Function Compute"},
            "paths": paths,
            "components": {"schemas": schemas,
                           "securitySchemes": {"HTTPBasic": {"type": "http", "scheme": "basic"}}}}


def _add_shadowed_methods(app, paths: dict, security: list) -> None:
    """A literal path that a templated rule also matches (`/sdapi/v2/tasks/txt2img` is a `{task_id}` too)
    answers that rule's methods as well: document them, with the 404 they give (no task has that id)."""
    adapter = app.url_map.bind("localhost")
    for path, operations in paths.items():
        if "{" in path:
            continue
        for method in sorted(set(adapter.allowed_methods(path)) - {"HEAD", "OPTIONS"}):
            if method.lower() in operations:
                continue
            endpoint, _ = adapter.match(path, method=method)
            responses = _responses(f"{method} {path}", path, method, False)
            responses.pop("200", None)
            responses["404"] = _error_response("not found: the path names no such resource")
            operations[method.lower()] = {
                "summary": f"{method} on the submit path (served by {endpoint}; answers 404)",
                "operationId": f"{endpoint.replace('.', '_')}_{method.lower()}_{path.rsplit('/', 1)[-1]}",
                "security": security, "responses": responses}


@bp.get("/openapi.json")
def openapi():
    return json_response(build_openapi(current_app))


@bp.get("/docs")
def docs():
    return SWAGGER_PAGE, 200, {"Content-Type": "text/html; charset=utf-8"}


@bp.get("/static/swagger/<path:filename>")
def swagger_asset(filename: str):
    from swagger_ui_bundle import swagger_ui_path
    return send_from_directory(str(swagger_ui_path), filename)
