"""Running a training task: in a child process, so that torch never enters a serving process.

`python -m sdfc.training run CONFIG.json` (sdfc/training/child.py) trains and writes one JSON line per step
(`{"step", "loss"}`) and a last `{"result": ...}` line on stdout; this side relays the steps to the task's
control (the task row's step/loss columns, /sdapi/v1/progress), and stops it on a cancel: SIGTERM (the child
stops before its next step and writes nothing), SIGKILL after a grace period. A child without torch (the
serving image) exits with EXIT_MISSING: a 501 in A1111's error shape. Any other failure fails the task with the
child's last stderr lines. Lines are read with a size limit, and no shell is involved.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

from ..api.errors import ApiError, ValidationFailed
from .training_requests import KINDS, TASK_TYPE, child_config, validate

log = logging.getLogger("sdfc.jobs")
CHILD_MODULE = "sdfc.training"
EXIT_INVALID = 2   # the child's exit code for a run that cannot start (TrainingError, DatasetError): a 422
EXIT_MISSING = 3   # ... for an interpreter without torch, diffusers, transformers or peft: a 501
MAX_LINE = 4 * 1024 * 1024  # a result line carries the LoRA's metadata (ss_tag_frequency of up to 1000 captions)
STDERR_LINES, STDERR_LINE_CHARS = 20, 2000
TERM_GRACE_S = 10.0  # a step on a slow device; then SIGKILL
CANCEL_POLL_S = 0.05


class TrainingChild:
    """One training run in a child process; `run()` blocks until it ends and returns its result body."""

    def __init__(self, config: dict, on_step, cancelled, grace_s: float = TERM_GRACE_S):
        self.config, self.on_step, self.cancelled, self.grace_s = config, on_step, cancelled, grace_s
        self.process: subprocess.Popen | None = None
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self.stopped = False  # we asked it to stop (a cancel)
        self.last_step, self.last_loss = 0, None

    def _env(self) -> dict:
        env = dict(os.environ)
        # The child imports this same sdfc, wherever it was imported from (a checkout as well as an install).
        root = str(Path(__file__).resolve().parent.parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def command(self, config_path: Path) -> list[str]:
        return [sys.executable, "-m", CHILD_MODULE, "run", str(config_path)]

    def run(self) -> dict:
        with tempfile.TemporaryDirectory(prefix="sdfc-train-") as tmp:
            path = Path(tmp) / "config.json"
            path.write_text(json.dumps(self.config))
            self.process = subprocess.Popen(self.command(path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=self._env())
            log.info("training child %d started (%s)", self.process.pid, self.config["kind"])
            readers = [threading.Thread(target=self._read_stderr, daemon=True),
                       threading.Thread(target=self._watch, daemon=True)]
            for thread in readers:
                thread.start()
            try:
                result, protocol_error = self._read_stdout()
                code = self.process.wait()
            except BaseException:
                self._stop()
                raise
            finally:
                readers[1].join()
                readers[0].join(5)
        return self._outcome(code, result, protocol_error)

    def _read_stdout(self) -> tuple[dict | None, str | None]:
        result, error = None, None
        stream = self.process.stdout
        while True:
            line = stream.readline(MAX_LINE + 1)
            if not line:
                return result, error
            if len(line) > MAX_LINE:  # skip the rest of an oversized line
                while line and not line.endswith(b"\n"):
                    line = stream.readline(MAX_LINE)
                error = f"the training process wrote a line over {MAX_LINE} bytes"
                continue
            try:
                message = json.loads(line)
            except ValueError:
                error = "the training process wrote a line that is not JSON"
                continue
            if not isinstance(message, dict):
                continue
            if "step" in message:
                step, loss = message.get("step"), message.get("loss")
                if isinstance(step, int) and not isinstance(step, bool) and isinstance(loss, (int, float)):
                    self.last_step, self.last_loss = step, float(loss)
                    self.on_step(step, float(loss))
            elif isinstance(message.get("result"), dict) or isinstance(message.get("error"), str):
                result = message  # the last line: {"result": ...} or {"error": ..., "detail": ...}

    def _read_stderr(self) -> None:
        for raw in iter(lambda: self.process.stderr.readline(STDERR_LINE_CHARS), b""):
            text = raw.decode("utf-8", "replace").rstrip("\n")
            if text:
                self.stderr.append(text)

    def _watch(self) -> None:
        """A cancel stops the child: SIGTERM, then SIGKILL after the grace period."""
        while self.process.poll() is None:
            if self.cancelled():
                self._stop()
                return
            try:
                self.process.wait(CANCEL_POLL_S)
            except subprocess.TimeoutExpired:
                pass

    def _stop(self) -> None:
        self.stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                log.warning("training child %d ignored SIGTERM for %.0f s: killed", self.process.pid, self.grace_s)
                self.process.kill()
                self.process.wait()

    def _outcome(self, code: int, result: dict | None, protocol_error: str | None) -> dict:
        if result is not None and "result" in result and code == 0:
            return result["result"]
        if self.stopped:  # cancelled, whether it answered in time or was killed: nothing was written
            return {"path": None, "steps_done": self.last_step, "final_loss": self.last_loss, "cancelled": True,
                    "metadata": {}}
        detail = (result or {}).get("detail") or protocol_error
        if code == EXIT_MISSING:
            raise ApiError(501, f"this instance cannot train ({detail or 'no torch'}); run training in the "
                                "training function or with `sdfc train`", error="NotImplemented")
        if code == EXIT_INVALID and detail:
            raise ApiError(422, detail, error="ValidationError")
        tail = "\n".join(self.stderr) or detail or "no output"
        raise ApiError(500, f"training failed (exit code {code}): {tail}", error="TrainingFailed")


def run_training_task(state, values: dict, control, kind: str = TASK_TYPE, config_overrides: dict | None = None
                      ) -> dict:
    """Run a validated request for the task runner; the result body. `state` is the host's ApiState (or the
    training function's stand-in: settings, queue, engine None). `control` is the task's JobControl: the child's
    steps (and loss) are reported through it, and its interrupt stops the child."""
    _, name_field, folder, _ = KINDS[kind]
    settings = state.settings
    out_dir = getattr(settings, folder)
    try:
        values = validate(values, settings.training_dir, out_dir, kind)  # the folders may have changed since
    except ValidationFailed as exc:
        raise ApiError(422, f"{exc.details[0]['loc'][-1]}: {exc.details[0]['msg']}", error="ValidationError") from None
    config = child_config(kind, values, settings.training_dir, out_dir, config_overrides)
    steps = config["config"]["steps"]
    control.report_training(0, steps, None)
    with state.queue:  # one job at a time on this instance's accelerator, in the same FIFO as generations
        child = TrainingChild(config, lambda step, loss: control.report_training(step, steps, loss),
                              cancelled=lambda: control.interrupted)
        outcome = child.run()
        written = outcome.get("path") is not None
        if written and state.engine is not None:  # listed and usable at once; between jobs
            state.engine.refresh_loras() if kind == "train-lora" else state.engine.refresh_embeddings()
    name = values[name_field] if written else None
    return {"lora": name if kind == "train-lora" else None, "embedding": name if kind == "train-embedding" else None,
            "file": Path(outcome["path"]).name if written else None, "steps_done": outcome.get("steps_done", 0),
            "steps": steps, "final_loss": outcome.get("final_loss"), "cancelled": bool(outcome.get("cancelled")),
            "seed": values["seed"], "metadata": outcome.get("metadata") or {}}
