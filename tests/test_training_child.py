"""The training child process's protocol as the serving side reads it (sdfc/jobs/training_process.py): steps relayed as
they come, a result line, oversized and non-JSON lines skipped within a size limit, a cancel that terminates the
child and kills one that ignores SIGTERM, a run that cannot start is a 422, a crash fails with the child's last
stderr lines, and the real child (`python -m sdfc.training run`) refuses what it cannot run."""
from __future__ import annotations

import textwrap
import threading
import time

import psutil
import pytest

from sdfc.api.errors import ApiError
from sdfc.jobs import training_process

pytest.importorskip("torch")


class ScriptChild(training_process.TrainingChild):
    """The child's side played by a short script instead of the trainer."""

    def __init__(self, script: str, **kwargs):
        super().__init__({"kind": "train-lora", "config": {}}, kwargs.pop("on_step", lambda s, l: None),
                         kwargs.pop("cancelled", lambda: False), **kwargs)
        self.script = textwrap.dedent(script)

    def command(self, config_path):
        return [__import__("sys").executable, "-c", self.script]


def test_steps_are_relayed_and_bad_lines_skipped_within_the_limit(monkeypatch):
    monkeypatch.setattr(training_process, "MAX_LINE", 1000)
    seen = []
    child = ScriptChild("""
        import json, sys
        print(json.dumps({"step": 1, "loss": 0.5}))
        print("x" * 5000)                      # over the limit: skipped, not held whole
        print("not json")
        print(json.dumps({"step": "2", "loss": 1}))   # not a step
        print(json.dumps({"step": 2, "loss": 0.25}))
        print(json.dumps({"result": {"path": "/x/a.safetensors", "steps_done": 2, "final_loss": 0.25,
                                     "cancelled": False, "metadata": {"ss_network_dim": "2"}}}))
    """, on_step=lambda step, loss: seen.append((step, loss)))
    outcome = child.run()
    assert seen == [(1, 0.5), (2, 0.25)]
    assert outcome == {"path": "/x/a.safetensors", "steps_done": 2, "final_loss": 0.25, "cancelled": False,
                       "metadata": {"ss_network_dim": "2"}}


def test_a_crash_fails_with_the_last_stderr_lines():
    child = ScriptChild("""
        import sys
        for i in range(100):
            print(f"log line {i}", file=sys.stderr)
        raise SystemExit(7)
    """)
    with pytest.raises(ApiError) as exc:
        child.run()
    assert exc.value.status == 500 and "exit code 7" in exc.value.detail
    assert "log line 99" in exc.value.detail and "log line 0\n" not in exc.value.detail  # only the tail


def test_missing_torch_is_a_501_and_an_invalid_run_a_422():
    missing = ScriptChild("""
        import json
        print(json.dumps({"error": "missing", "detail": "no torch, peft"}))
        raise SystemExit(3)
    """)
    with pytest.raises(ApiError) as exc:
        missing.run()
    assert exc.value.status == 501 and "no torch, peft" in exc.value.detail
    invalid = ScriptChild("""
        import json
        print(json.dumps({"error": "invalid", "detail": "resolution must be a multiple of 16"}))
        raise SystemExit(2)
    """)
    with pytest.raises(ApiError) as exc:
        invalid.run()
    assert exc.value.status == 422 and exc.value.detail == "resolution must be a multiple of 16"


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_a_cancel_ends_the_child(ignores_sigterm):
    stop = threading.Event()
    child = ScriptChild(f"""
        import json, signal, sys, time
        if {ignores_sigterm}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        step = 0
        while True:
            step += 1
            print(json.dumps({{"step": step, "loss": 1.0}}), flush=True)
            time.sleep(0.02)
    """, on_step=lambda step, loss: step >= 3 and stop.set(), cancelled=stop.is_set, grace_s=0.5)
    started = time.monotonic()
    outcome = child.run()
    assert outcome["cancelled"] and outcome["path"] is None and outcome["steps_done"] >= 3
    assert child.process.returncode == (-9 if ignores_sigterm else -15)  # SIGKILL after the grace period
    assert not psutil.pid_exists(child.process.pid) or psutil.Process(child.process.pid).status() == "zombie"
    assert time.monotonic() - started < 10


def test_the_real_child_refuses_what_it_cannot_run(tmp_path):
    """`python -m sdfc.training run`: a base that is no diffusers folder is a 422; an unknown kind a crash."""
    (tmp_path / "images").mkdir()
    config = {"base": str(tmp_path), "images": str(tmp_path / "images"), "output": str(tmp_path / "x.safetensors"),
              "steps": 1, "resolution": 64}
    with pytest.raises(ApiError) as exc:
        training_process.TrainingChild({"kind": "train-lora", "config": config}, lambda s, l: None, lambda: False).run()
    assert exc.value.status == 422 and "not a diffusers Stable Diffusion folder" in exc.value.detail
    with pytest.raises(ApiError) as exc:
        training_process.TrainingChild({"kind": "train-nothing", "config": config}, lambda s, l: None, lambda: False).run()
    assert exc.value.status == 500 and "unknown training kind" in exc.value.detail
