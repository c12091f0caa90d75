"""The training child process: `python -m sdfc.training run CONFIG.json`, started by the task runner
(sdfc/jobs/training_process.py) so that torch never loads in a serving process.

CONFIG.json is `{"kind": "train-lora" | "train-embedding", "config": {...}}`, already validated and confined by
the serving side (sdfc/jobs/training_requests.py). stdout carries one JSON line per optimiser step,
`{"step": n, "loss": x}`, then `{"result": {"path", "steps_done", "final_loss", "cancelled", "metadata"}}`;
logs go to stderr. SIGTERM stops the run before its next step, and nothing is written. Exit codes: 0 done (or
stopped), 2 a run that cannot start (`{"error": "invalid", "detail": ...}`), 3 torch, diffusers, transformers
or peft missing (`{"error": "missing", ...}`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import signal
import sys
from pathlib import Path

EXIT_INVALID, EXIT_MISSING = 2, 3  # as sdfc/jobs/training_process.py reads them
NEEDS = ("torch", "diffusers", "transformers", "peft")
PATHS = ("base", "images", "output")


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def build(kind: str, values: dict):
    """The trainer and its config dataclass for one run."""
    values = {**values, **{k: Path(values[k]) for k in PATHS}}
    if kind == "train-embedding":
        import numpy as np

        from .embedding_trainer import EmbeddingTrainingConfig, train_embedding
        if values.get("init_vectors") is not None:
            values["init_vectors"] = np.asarray(values["init_vectors"], np.float32)
        return train_embedding, EmbeddingTrainingConfig(**values)
    if kind == "train-lora":
        from .lora_trainer import LoraTrainingConfig, train_lora
        return train_lora, LoraTrainingConfig(**values)
    raise ValueError(f"unknown training kind {kind!r}")


def run(config_path: Path) -> int:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        _say({"error": "missing", "detail": f"no {', '.join(missing)}", "missing": missing})
        return EXIT_MISSING
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    document = json.loads(Path(config_path).read_text())
    from .dataset import DatasetError
    from .lora_trainer import TrainingError

    try:
        train, config = build(document["kind"], document["config"])
        result = train(config, lambda step, loss: _say({"step": step, "loss": loss}),
                       cancelled=lambda: stop["requested"])
    except (TrainingError, DatasetError) as exc:
        _say({"error": "invalid", "detail": str(exc)})
        return EXIT_INVALID
    _say({"result": {"path": str(result.path) if result.path is not None else None,
                     "steps_done": result.steps_done, "final_loss": result.final_loss,
                     "cancelled": result.cancelled, "metadata": getattr(result, "metadata", {}) or {}}})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "run":
        print("usage: python -m sdfc.training run CONFIG.json", file=sys.stderr)
        return 64
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(Path(argv[1]))
