"""Engine behaviour beyond numerics: seeds, batches, progress, interrupt/skip, errors, no torch."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sdfc.engine import (Engine, GenerationRequest, InvalidRequestError, JobControl, ModelLoadError,
                         ModelNotFoundError, NaNError)
from sdfc.engine.pipeline import MAX_SEED
from sdfc.engine.samplers import SAMPLERS

from .conftest import MODELS_DIR, TINY_MODEL


def tiny_request(**kw) -> GenerationRequest:
    base = dict(prompt="a red house", negative_prompt="", width=64, height=64, steps=8, cfg_scale=7.0,
                sampler_name="Euler a", seed=10)
    base.update(kw)
    return GenerationRequest(**base)


# Every sampler but DPM adaptive, whose step-size control measures its error over the whole batch (in
# k-diffusion and so in A1111 too): its images depend on their batch by design.
BATCH_DETERMINISTIC = [s.name for s in SAMPLERS if s.name != "DPM adaptive"]


@pytest.mark.parametrize("sampler", BATCH_DETERMINISTIC)
def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(engine, sampler):
    batch = engine.generate(tiny_request(sampler_name=sampler, batch_size=3))
    assert batch.seeds == [10, 11, 12]
    for i, seed in enumerate(batch.seeds):
        single = engine.generate(tiny_request(sampler_name=sampler, seed=seed))
        assert np.abs(batch.float_images[i] - single.float_images[0]).max() <= 1e-5
    assert np.abs(batch.float_images[0] - batch.float_images[1]).max() > 1e-2


def test_n_iter_continues_the_seeds_and_counts_jobs(engine):
    control = JobControl()
    result = engine.generate(tiny_request(batch_size=2, n_iter=2), control)
    assert result.seeds == [10, 11, 12, 13] and len(result.images) == 4
    assert result.subseeds[1] == result.subseeds[0] + 1
    assert control.job_count == 2
    single = engine.generate(tiny_request(seed=13))
    assert np.abs(result.float_images[3] - single.float_images[0]).max() <= 1e-5


def test_random_seed_is_resolved_and_reproducible(engine):
    result = engine.generate(tiny_request(seed=-1))
    seed = result.seeds[0]
    assert 0 <= seed < MAX_SEED
    again = engine.generate(tiny_request(seed=seed))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))


class StopAt(JobControl):
    """Interrupts or skips from inside the job at a given step, deterministically."""

    def __init__(self, step, action, job=0):
        super().__init__()
        self.at, self.action, self.job, self.seen = step, action, job, []

    def _step(self, step, latent):
        super()._step(step, latent)
        self.seen.append((self.job_no, step, self.progress))
        if self.job_no == self.job and step == self.at:
            getattr(self, self.action)()


def test_progress_is_reported_every_step(engine):
    control = StopAt(step=-1, action="skip")
    engine.generate(tiny_request(n_iter=2, steps=5), control)
    assert [s for _, s, _ in control.seen] == [1, 2, 3, 4, 5] * 2
    progress = [p for _, _, p in control.seen]
    assert all(0 < p <= 1 for p in progress) and progress == sorted(progress)
    assert progress[4] == pytest.approx(0.5) and progress[-1] == pytest.approx(1.0)


def test_interrupt_stops_the_job_and_returns_the_current_image(engine):
    full = engine.generate(tiny_request(n_iter=3))
    control = StopAt(step=3, action="interrupt")
    result = engine.generate(tiny_request(n_iter=3), control)
    assert result.interrupted
    assert len(result.images) == 1 and result.seeds == [10]
    assert control.seen[-1][:2] == (0, 3)  # nothing ran after the interrupt
    assert np.abs(result.float_images[0] - full.float_images[0]).max() > 1e-3


def test_skip_abandons_one_batch_and_goes_on(engine):
    full = engine.generate(tiny_request(n_iter=2))
    control = StopAt(step=2, action="skip")
    result = engine.generate(tiny_request(n_iter=2), control)
    assert not result.interrupted and len(result.images) == 2
    assert np.abs(result.float_images[0] - full.float_images[0]).max() > 1e-3
    assert np.abs(result.float_images[1] - full.float_images[1]).max() <= 1e-6


@pytest.mark.parametrize("field,value,named", [
    ("sampler_name", "Euler b", "'Euler b'"),
    ("scheduler", "Fancy", "'Fancy'"),
    ("width", 65, "65"),
    ("height", 100, "100"),
    ("steps", 0, "0"),
    ("batch_size", 0, "0"),
    ("noise_source", "TPU", "'TPU'"),
])
def test_bad_requests_name_the_offending_value(engine, field, value, named):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(tiny_request(**{field: value}))
    assert named in str(err.value) and field.split("_")[0] in str(err.value).lower()


def test_unknown_sampler_error_lists_the_valid_ones(engine):
    with pytest.raises(InvalidRequestError, match="Euler a.*DDIM|DDIM.*Euler a"):
        engine.generate(tiny_request(sampler_name="nope"))


def test_missing_models_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        Engine(missing)
    with pytest.raises(ModelNotFoundError, match="no exported model"):
        Engine(tmp_path)


def test_unknown_model_lists_the_available_ones(engine):
    with pytest.raises(ModelNotFoundError, match=r"'other'.*tiny-sd \["):
        engine.generate(tiny_request(model="other"))


def test_corrupt_onnx_file_is_named(tmp_path):
    broken = tmp_path / "tiny-sd"
    shutil.copytree(TINY_MODEL, broken)
    (broken / "unet" / "model.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match=r"unet/model\.onnx"):
        Engine(tmp_path).generate(tiny_request())


def test_missing_weights_file_is_named(tmp_path):
    broken = tmp_path / "tiny-sd"
    shutil.copytree(TINY_MODEL, broken)
    (broken / "vae_decoder" / "model.onnx_data").unlink()
    with pytest.raises(ModelLoadError, match=r"vae_decoder/model\.onnx"):
        Engine(tmp_path).generate(tiny_request())


def test_nan_output_is_a_clear_error(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    poisoned = tmp_path / "tiny-sd"
    shutil.copytree(TINY_MODEL, poisoned)
    path = poisoned / "unet" / "model.onnx"
    graph = onnx.load(str(path))
    # Multiply the UNet's output by NaN: the kind of result an fp16 overflow gives.
    out = graph.graph.output[0].name
    for node in graph.graph.node:
        node.output[:] = [o + "_raw" if o == out else o for o in node.output]
    graph.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan_const"))
    graph.graph.node.append(helper.make_node("Mul", [out + "_raw", "nan_const"], [out]))
    onnx.save(graph, str(path))
    with pytest.raises(NaNError, match="NaN"):
        Engine(tmp_path).generate(tiny_request())


def test_engine_run_imports_no_torch():
    code = textwrap.dedent(f"""
        import sys
        from sdfc.engine import Engine, GenerationRequest
        r = Engine({str(MODELS_DIR)!r}).generate(GenerationRequest(width=64, height=64, steps=2, seed=1))
        assert len(r.images) == 1
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("torch", "diffusers", "transformers", "optimum"))
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
