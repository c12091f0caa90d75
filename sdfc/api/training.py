"""A1111's synchronous textual-inversion routes, `POST /sdapi/v1/create/embedding` and `/train/embedding`: the
serving side (no torch), training itself in the task runner's child process (sdfc/jobs/training_process.py).

- create embedding: torch-free (the serving image answers it). The served model's token vectors of the init
  text, spread over the vectors as A1111 spreads them, written as A1111's `.safetensors` layout (one
  `emb_params` tensor, step 0) into the embeddings folder (SDFC_EMBEDDINGS_DIR), then listed at once.
- train embedding: A1111 trains an embedding that exists (made by create embedding) on the loaded checkpoint,
  up to `steps` in all, in the request. Here the request's fields are mapped onto the `train-embedding` task's
  (sdfc/jobs/training_requests.py validates them, with its folder confinement and bounds), and it runs
  synchronously under the generation queue, in a training child process (sdfc/jobs/training_process.py), continuing the
  file's vectors and step count. The trainer needs a diffusers model: `base`, a folder inside the training-data
  folder (SDFC_TRAINING_DIR), an sdfc field. A1111 fields the trainer cannot honour (prompt templates, preview
  images, log and checkpoint writes, gradient accumulation, clipping, tag shuffling, ...) are refused with a 422
  naming them unless they hold the value that turns the feature off; preview_* fields only matter with
  create_image_every (0 here, as in A1111 they then do nothing). Training is square (training_width =
  training_height): A1111 squashes each image to that size, sdfc's trainer centre-crops it (the same for square
  images). An interrupt terminates the child process, and nothing is written (A1111 saves it). Without torch
  (the serving image in FC) it answers 501: the train-embedding task runs in the training function there.

Answers are A1111's: `{"info": "create embedding filename: <file>"}` (`create embedding error: ...` for an
existing file), `{"info": "train embedding complete: filename: <file> error: <None or why>"}`; `<file>` is the
file's name in the embeddings folder (A1111 gives the server's full path, which sdfc does not reveal).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..jobs.training_process import run_training_task
from ..jobs.training_requests import (FOLDER_PATTERN, MAX_BATCH, MAX_RESOLUTION, MAX_STEPS, MAX_VECTORS,
                                      NAME_PATTERN, PROMPT_PATTERN, validate)
from .errors import ApiError, ValidationFailed
from .schema import Field as F
from .schema import Model

KIND = "train-embedding"
INIT_TEXT_PATTERN = r"^[\s\S]{0,200}$"
# A1111 sends the rate as text: a decimal from 0.000000001 to 1 (a non-zero digit in at most nine places)
LEARN_RATE_STRING = r"^\s*(0?\.(?=[0-9]{0,8}[1-9])[0-9]{1,9}|1(\.0{0,9})?)\s*$"
LEARN_RATE_SCHEMA = {"anyOf": [{"type": "number", "minimum": 1e-9, "maximum": 1},
                               {"type": "string", "pattern": LEARN_RATE_STRING}], "nullable": True}

@dataclass(frozen=True)
class StrictModel(Model):
    """A model whose document says what `_parse` enforces beyond its fields' own checks: no other fields, and
    for each of `off_only` the one value (or null, its default) sdfc can honour."""
    off_only: tuple = ()
    overrides: tuple = ()  # (field, its JSON schema): what a field of type "any" takes

    def json_schema(self) -> dict:
        schema = super().json_schema()
        schema["additionalProperties"] = False
        for name, accepted in self.overrides:
            schema["properties"][name].update(accepted)
        for name, off, feature in self.off_only:
            prop = schema["properties"][name]
            prop["enum"] = [off, None]
            prop["description"] = f"{json.dumps(off)} only: sdfc has no {feature.split(' (')[0]}"
        return schema


CREATE_EMBEDDING = StrictModel("CreateEmbeddingRequest", (
    F("name", "str", None, "the embedding's name: <name>.safetensors in the embeddings folder, used as a word of "
                           "the prompt", required=True, pattern=NAME_PATTERN),
    F("num_vectors_per_token", "int", 1, "vectors (tokens) of the embedding", ge=1, le=MAX_VECTORS, strings=False),
    F("overwrite_old", "bool", False, "replace an existing embedding of that name"),
    F("init_text", "str", "*", "the words whose token vectors start it (empty: zeros)", pattern=INIT_TEXT_PATTERN),
), description="A1111's create embedding: an untrained textual-inversion embedding from the served model's "
               "token vectors, into the embeddings folder.")

# (field, the value that keeps the feature off, what sdfc would need to honour it)
OFF_ONLY = (
    ("gradient_step", 1, "gradient accumulation"),
    ("varsize", False, "training at each image's own size (sdfc trains square centre crops here)"),
    ("clip_grad_mode", "disabled", "gradient clipping"),
    ("shuffle_tags", False, "caption tag shuffling"),
    ("tag_drop_out", 0, "caption tag dropout"),
    ("use_weight", False, "alpha-channel loss weights"),
    ("create_image_every", 0, "preview images during training"),
    ("save_embedding_every", 0, "intermediate embedding copies in the log directory"),
    ("log_directory", "", "training logs (loss CSV, copies, images)"),
    ("template_filename", "", "prompt template files: captions are the .txt beside each image (A1111's "
                              "[filewords]), or `prompt`; [name] or the name marks the embedding, else it goes "
                              "in front"),
)

TRAIN_EMBEDDING_V1 = StrictModel("TrainEmbeddingV1Request", (
    F("embedding_name", "str", None, "an embedding of the embeddings folder (made by /sdapi/v1/create/embedding): "
                                     "its vectors train on, and it is written back", required=True,
      pattern=NAME_PATTERN),
    F("learn_rate", "any", 5e-3, "AdamW's learning rate, a number from 1e-9 to 1 or such a decimal as text "
                                 "(A1111's rate schedules `rate:step, ...` are refused: sdfc's rate is constant)"),
    F("batch_size", "int", 1, "images per step", ge=1, le=MAX_BATCH, strings=False),
    F("data_root", "str", None, "a folder of images inside the training-data folder (SDFC_TRAINING_DIR), each "
                                "with an optional caption .txt beside it", required=True, pattern=FOLDER_PATTERN),
    F("training_width", "int", 512, "training size: square, so equal to training_height; a multiple of the "
                                    "model's size step", ge=8, le=MAX_RESOLUTION, strings=False),
    F("training_height", "int", 512, "equal to training_width", ge=8, le=MAX_RESOLUTION, strings=False),
    F("steps", "int", 100, "the step the embedding is trained to, counting the steps it already has (A1111's max "
                           "steps)", ge=1, le=MAX_STEPS, strings=False),
    F("latent_sampling_method", "str", "once", "once (deterministic and random are refused: latents are sampled "
                                               "once)", pattern=r"^(once|deterministic|random)$"),
    F("clip_grad_value", "float", 0.1, "unused: clip_grad_mode must be disabled", ge=0, le=1e6),
    F("save_image_with_stored_embedding", "bool", True, "unused: create_image_every must be 0"),
    F("preview_from_txt2img", "bool", False, "unused: create_image_every must be 0"),
    F("preview_prompt", "str", "", "unused: create_image_every must be 0", pattern=PROMPT_PATTERN),
    F("preview_negative_prompt", "str", "", "unused: create_image_every must be 0", pattern=PROMPT_PATTERN),
    F("preview_steps", "int", 20, "unused: create_image_every must be 0", ge=1, le=150, strings=False),
    F("preview_sampler_name", "str", None, "unused: create_image_every must be 0", pattern=r"^[\s\S]{0,100}$"),
    F("preview_cfg_scale", "float", 7.0, "unused: create_image_every must be 0", ge=0, le=100),
    F("preview_seed", "int", -1, "unused: create_image_every must be 0", ge=-1, le=2**32 - 1, strings=False),
    F("preview_width", "int", 512, "unused: create_image_every must be 0", ge=8, le=MAX_RESOLUTION, strings=False),
    F("preview_height", "int", 512, "unused: create_image_every must be 0", ge=8, le=MAX_RESOLUTION, strings=False),
    F("id_task", "str", None, "A1111's task id; training's progress shows on /sdapi/v1/progress",
      pattern=r"^[\s\S]{0,200}$"),
    F("gradient_step", "int", 1, "1 only (no gradient accumulation)", ge=1, le=64, strings=False),
    F("varsize", "bool", False, "false only"),
    F("clip_grad_mode", "str", "disabled", "disabled only", pattern=r"^(disabled|value|norm)$"),
    F("shuffle_tags", "bool", False, "false only"),
    F("tag_drop_out", "float", 0, "0 only", ge=0, le=1),
    F("use_weight", "bool", False, "false only"),
    F("create_image_every", "int", 0, "0 only (no preview images)", ge=0, le=MAX_STEPS, strings=False),
    F("save_embedding_every", "int", 0, "0 only (no intermediate copies)", ge=0, le=MAX_STEPS, strings=False),
    F("log_directory", "str", "", "empty only (sdfc writes no training logs)", pattern=r"^[\s\S]{0,1000}$"),
    F("template_filename", "str", "", "empty only (captions: the .txt beside each image, or prompt)",
      pattern=r"^[\s\S]{0,1000}$"),
    # sdfc's own fields
    F("base", "str", None, "sdfc: the served model in diffusers form, a folder inside the training-data folder "
                           "(the ONNX export cannot be trained)", required=True, pattern=FOLDER_PATTERN),
    F("prompt", "str", None, "sdfc: the caption of images without a .txt", pattern=PROMPT_PATTERN),
    F("seed", "int", -1, "sdfc: the training seed (-1: a random one)", ge=-1, le=2**32 - 1, strings=False),
), description="A1111's train embedding, run synchronously: an existing embedding trained on a folder of images "
               "and written back.", off_only=OFF_ONLY, overrides=(("learn_rate", LEARN_RATE_SCHEMA),))

# The task's field names, as A1111's request calls them (for the task validation's errors).
TASK_TO_A1111 = {"images": "data_root", "resolution": "training_width", "learn_rate": "learn_rate"}


def _refuse(field: str, msg: str) -> ValidationFailed:
    return ValidationFailed([{"loc": ["body", field], "msg": msg, "type": "value_error"}])


def _parse(model: Model, body) -> dict:
    """Field by field; a field the model does not know is refused (A1111 passes the body to a function as keyword
    arguments, which fails on one: here it must not pass for a setting that took effect)."""
    values, errors = model.parse(body)
    known = {f.name for f in model.fields}
    errors += [{"loc": ["body", key], "msg": "extra fields not permitted", "type": "value_error.extra"}
               for key in (body if isinstance(body, dict) else ()) if key not in known]
    if errors:
        raise ValidationFailed(errors)
    return {f.name: f.default if values[f.name] is None else values[f.name] for f in model.fields}


# --- create ----------------------------------------------------------------------------------------

def initial_vectors(table: np.ndarray, init_ids: list[int], count: int) -> np.ndarray:
    """A1111's create embedding: the init text's first `count` token vectors, vector i taking token
    i·n // count of the n there are (so fewer tokens are each repeated in turn); zeros without an init text."""
    ids = init_ids[:count]
    vectors = np.zeros((count, table.shape[1]), np.float32)
    for i in range(count if ids else 0):
        vectors[i] = table[ids[i * len(ids) // count]]
    return vectors


def write_embedding(path: Path, vectors: np.ndarray, metadata: dict[str, str]) -> Path:
    """A `.safetensors` holding one float32 `emb_params` tensor, written atomically (torch-free: the serving
    image has no `safetensors` package)."""
    data = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    header = {"__metadata__": metadata,
              "emb_params": {"dtype": "F32", "shape": list(vectors.shape), "data_offsets": [0, len(data)]}}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".create-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw + data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def create_embedding(state, body) -> dict:
    from ..engine.prompt_chunks import make_clip_encode_fn

    values = _parse(CREATE_EMBEDDING, body)
    folder = state.settings.embeddings_dir
    if folder is None:
        raise ApiError(503, "no embeddings folder is configured (SDFC_EMBEDDINGS_DIR)", error="NotConfigured")
    path = folder / f"{values['name']}.safetensors"
    with state.queue:  # between jobs: no job sees its token table change under it
        if path.exists() and not values["overwrite_old"]:  # A1111's assertion, answered as A1111 answers it
            return {"info": f"create embedding error: file {path.name} already exists"}
        model = state.engine.load()
        if len(model.info.arch.text_encoders) != 1:  # SDXL: clip_l + clip_g vectors, which sdfc cannot use yet
            raise ApiError(400, f"embeddings for {model.info.architecture} models are not supported yet (model "
                                f"{model.info.name!r}): select an SD 1.x or 2.x model", error="NotImplementedError")
        # A1111 encodes `init_text or "*"` but keeps zeros for an empty one
        ids = make_clip_encode_fn(model.tokenizer)([values["init_text"]])[0] if values["init_text"] else []
        vectors = initial_vectors(model.token_embedding_table(), ids, values["num_vectors_per_token"])
        write_embedding(path, vectors, {"name": values["name"], "step": "0", "init_text": values["init_text"],
                                        "created_at": str(time.time())})
        state.engine.refresh_embeddings()  # usable at once, as A1111 reloads its embeddings
    return {"info": f"create embedding filename: {path.name}"}


# --- train -----------------------------------------------------------------------------------------

def _learn_rate(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _refuse("learn_rate", "a number or a numeric string expected")
    if isinstance(value, str):
        if ":" in value or "," in value:
            raise _refuse("learn_rate", "learning-rate schedules are not supported by sdfc: send one rate")
        if not re.match(LEARN_RATE_STRING, value):
            raise _refuse("learn_rate", "a decimal from 0.000000001 to 1 expected (no exponent)")
    rate = float(value)
    if not (math.isfinite(rate) and 1e-9 <= rate <= 1):
        raise _refuse("learn_rate", "a learning rate from 1e-9 to 1 expected")
    return rate


def task_values(values: dict) -> dict:
    """The A1111 request as the train-embedding task's request, or a 422 for what the trainer cannot honour."""
    for field, off, feature in OFF_ONLY:
        if values[field] != off:
            raise _refuse(field, f"{feature} is not supported by sdfc: send {json.dumps(off)} or leave it out")
    if values["latent_sampling_method"] != "once":
        raise _refuse("latent_sampling_method", "only once is supported by sdfc (latents are sampled once)")
    if values["training_width"] != values["training_height"]:
        raise _refuse("training_height", "sdfc trains square images: training_height must equal training_width")
    return {"base": values["base"], "images": values["data_root"], "embedding_name": values["embedding_name"],
            "prompt": values["prompt"], "learn_rate": _learn_rate(values["learn_rate"]),
            "resolution": values["training_width"], "batch_size": values["batch_size"], "seed": values["seed"],
            "buckets": False, "overwrite": True}  # A1111 writes the trained embedding over the one it read


def _task_validate(state, values: dict) -> dict:
    settings = state.settings
    try:
        return validate(values, settings.training_dir, settings.embeddings_dir, KIND)
    except ValidationFailed as exc:  # named as the A1111 request names them
        raise ValidationFailed([{**d, "loc": [TASK_TO_A1111.get(part, part) for part in d["loc"]]}
                                for d in exc.details]) from None
    except ApiError as exc:
        if exc.detail.startswith("images:"):
            exc.detail = "data_root:" + exc.detail[len("images:"):]
        raise


class _TrainingControl:
    """The job's progress on /sdapi/v1/progress and /interrupt, as A1111 shows its training. Registered as the
    running job at its first step, which the trainer reports inside the queue (not while it waits)."""

    def __init__(self, state):
        from ..jobs.runner import TaskControl
        self.state, self.control, self.started = state, TaskControl(), False

    @property
    def interrupted(self) -> bool:
        return self.control.interrupted

    def report_training(self, step: int, steps: int, loss) -> None:
        if step >= 1 and not self.started:
            self.started = True
            self.state.start_job("train_embedding", self.control)
        self.control.report_training(step, steps, loss)

    def end(self) -> None:
        if self.started:
            self.state.end_job()


def train_embedding(state, body) -> dict:
    values = _parse(TRAIN_EMBEDDING_V1, body)
    name = values["embedding_name"]
    existing = state.engine.embeddings_of().loaded.get(name)
    if existing is None:
        raise ApiError(404, f"embedding_name: no embedding {name!r} is loaded from the embeddings folder; create it "
                            "with /sdapi/v1/create/embedding", error="NotFound")
    task = task_values(values)
    start = existing.step or 0
    task["num_vectors_per_token"] = existing.count
    task["steps"] = max(values["steps"] - start, 1)
    task = _task_validate(state, task)
    filename = f"{name}.safetensors"
    if start >= values["steps"]:  # A1111: already trained that far; nothing to do, not an error
        return {"info": f"train embedding complete: filename: {filename} error: None"}
    control = _TrainingControl(state)
    try:
        result = run_training_task(state, task, control, KIND,
                                   config_overrides={"init_vectors": np.asarray(existing.vectors, np.float32).tolist(),
                                                     "start_step": start})
    finally:
        control.end()
    if result["cancelled"]:
        return {"info": f"train embedding complete: filename:  error: interrupted at step "
                        f"{start + result['steps_done']} of {values['steps']}: nothing was written"}
    return {"info": f"train embedding complete: filename: {result['file']} error: None"}
