"""IO binding (OnnxModel.io_binding): the same images as plain session.run, bit for bit, and the UNet's text
conditioning made into a device value once per prompt-schedule segment, not once per step.

On the CPU the bound path is the one a GPU takes (inputs bound from host memory or as kept OrtValues, outputs
allocated by onnxruntime on the session's device and copied back), so it is proven here.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from sdfc.engine import Engine, GenerationRequest
from sdfc.engine.models import session_device

from .conftest import MODELS_DIR, TINY_MODEL

# 77 tokens and more: a second chunk, so cond (154 tokens) and uncond (77) cannot share a UNet batch.
LONG_PROMPT = ", ".join(["a red house on a green hill under a blue sky"] * 9)


@pytest.fixture(scope="module")
def engine():
    return Engine(MODELS_DIR)  # its own: the tests switch io_binding on its model


def request(**kw) -> GenerationRequest:
    values = dict(prompt="a red house", negative_prompt="blurry", width=64, height=64, steps=8, cfg_scale=7.0,
                  sampler_name="Euler", seed=3)
    values.update(kw)
    return GenerationRequest(**values)


def generate(engine, io_binding: bool, req: GenerationRequest) -> list[np.ndarray]:
    engine.load().io_binding = io_binding
    try:
        return engine.generate(req).float_images
    finally:
        engine.load().io_binding = True


class CountingOrtValues:
    """Counts the OrtValues made from numpy (the engine's resident inputs; onnxruntime's own runs make none)."""

    def __init__(self, monkeypatch):
        self.created = []
        original = ort.OrtValue.ortvalue_from_numpy

        def counting(array, *args, **kwargs):
            self.created.append(array.shape)
            return original(array, *args, **kwargs)

        monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(counting))


class CountingUnetRuns:
    def __init__(self, monkeypatch, model):
        self.calls = 0
        original = model.unet

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "unet", counting)


def init_image(seed: int = 1) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_io_binding_is_on_by_default_on_the_cpu_and_can_be_turned_off(engine):
    model = engine.load()
    assert model.io_binding is True
    assert session_device(model.sessions["unet"]) == ("cpu", 0)
    assert Engine(MODELS_DIR, io_binding=False).load().io_binding is False


CASES = {
    "euler": {},
    "ddim": {"sampler_name": "DDIM"},
    "prompt editing": {"prompt": "[a red house:a blue car:0.5]"},
    "cfg 1 cond only": {"cfg_scale": 1.0, "negative_prompt": ""},
    "and sub-prompts": {"prompt": "a red house AND a blue car :0.7", "batch_size": 2},
    "split cond and uncond": {"prompt": LONG_PROMPT},
    "img2img": {"init_images": [init_image()], "denoising_strength": 0.6},
}


@pytest.mark.parametrize("case", CASES)
def test_io_binding_gives_the_images_of_plain_runs(engine, case):
    req = request(**CASES[case])
    plain = generate(engine, False, req)
    bound = generate(engine, True, req)
    assert len(plain) == len(bound) == req.batch_size
    for p, b in zip(plain, bound):
        assert np.array_equal(p, b)


def test_the_bound_path_runs_every_component_without_session_run(engine, monkeypatch):
    """With io_binding on, no session is run through plain run(): text encoder, UNet, VAE encoder and decoder."""
    def refused(self, *args, **kwargs):
        raise AssertionError("session.run() called with IO binding on")

    expected = generate(engine, False, request(init_images=[init_image()], denoising_strength=0.6))
    monkeypatch.setattr(ort.InferenceSession, "run", refused)
    bound = generate(engine, True, request(init_images=[init_image()], denoising_strength=0.6))
    assert np.array_equal(expected[0], bound[0])


@pytest.mark.parametrize("prompt,segments", [("a red house", 1), ("[a red house:a blue car:0.5]", 2),
                                             ("[a red house:a blue car:2] [on a hill::6]", 3)])
def test_the_conditioning_value_is_made_once_per_schedule_segment(engine, monkeypatch, prompt, segments):
    model = engine.load()
    created, unet = CountingOrtValues(monkeypatch), CountingUnetRuns(monkeypatch, model)
    engine.generate(request(prompt=prompt, steps=8))
    assert unet.calls == 8  # Euler: one denoiser call (one UNet batch) per step
    # One value per segment: the cond+uncond batch's hidden states (2 rows, 77 tokens, width 32).
    assert created.created == [(2, 77, 32)] * segments


def test_split_batches_and_cond_only_keep_one_value_per_kind(engine, monkeypatch):
    created = CountingOrtValues(monkeypatch)
    engine.generate(request(prompt=LONG_PROMPT, steps=6))
    assert sorted(created.created) == [(1, 77, 32), (1, 154, 32)]  # uncond and cond, each once for 6 steps
    created.created.clear()
    engine.generate(request(cfg_scale=1.0, negative_prompt="", steps=6))
    assert created.created == [(1, 77, 32)]  # CFG 1: the cond rows only, once


def test_plain_runs_make_no_ort_values(engine, monkeypatch):
    created = CountingOrtValues(monkeypatch)
    generate(engine, False, request())
    assert created.created == []


def test_the_values_are_in_the_unets_declared_dtype(engine):
    model = engine.load()
    hidden = np.random.default_rng(0).standard_normal((2, 77, 32)).astype(np.float64)
    value = model.resident_inputs("unet", {"encoder_hidden_states": hidden})["encoder_hidden_states"]
    assert isinstance(value, ort.OrtValue) and value.data_type() == "tensor(float)"
    assert value.device_name().lower() == "cpu" and value.shape() == [2, 77, 32]
    assert np.array_equal(value.numpy(), hidden.astype(np.float32))
    model.io_binding = False
    try:
        plain = model.resident_inputs("unet", {"encoder_hidden_states": hidden})["encoder_hidden_states"]
    finally:
        model.io_binding = True
    assert isinstance(plain, np.ndarray) and plain.dtype == np.float32


def test_a_scalar_timestep_stays_scalar_when_bound(engine):
    """The tiny UNet takes a 0-d timestep: bound from the host it must keep its shape (a 1-d one breaks the
    broadcast over the batch)."""
    model = engine.load()
    assert model.sessions["unet"].get_inputs()[1].shape == []
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    hidden = np.random.default_rng(2).standard_normal((2, 77, 32)).astype(np.float32)
    bound = model.unet(x, 500.5, model.resident_inputs("unet", {"encoder_hidden_states": hidden})
                       ["encoder_hidden_states"])
    model.io_binding = False
    try:
        plain = model.unet(x, 500.5, hidden)
    finally:
        model.io_binding = True
    assert np.array_equal(bound, plain)


@pytest.fixture(scope="module")
def sdxl_engine(tmp_path_factory):
    """A tiny SDXL base (about 35 s to build and export on the 2-core machine): pooled text and size ids too."""
    from models_export.onnx_export import export_diffusers
    from models_export.tiny_sdxl import build_sdxl

    root = tmp_path_factory.mktemp("sdxl-io-binding")
    base = build_sdxl(root / "diffusers" / "tiny-sdxl", seed=0, tokenizer_from=TINY_MODEL / "tokenizer")
    export_diffusers(base, root / "models" / "tiny-sdxl", name="tiny-sdxl", validate=False)
    return Engine(root / "models")


def test_sdxl_with_io_binding_gives_the_images_of_plain_runs(sdxl_engine, monkeypatch):
    req = request(prompt="[a photo of a cat:a drawing of a dog:0.5]", steps=6)
    plain = generate(sdxl_engine, False, req)
    created = CountingOrtValues(monkeypatch)
    bound = generate(sdxl_engine, True, req)
    assert np.array_equal(plain[0], bound[0])
    # Per segment: hidden states, pooled text (text_embeds) and size ids (time_ids) of the CFG batch.
    assert created.created == [(2, 77, 96), (2, 32), (2, 6)] * 2
