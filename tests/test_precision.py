"""Per-component precision (issue 13): an fp16 export keeps the UNet's timestep float32 and declares each part's
precision; the engine feeds each input in its own dtype; an fp16 VAE that overflows is decoded again in fp32
(A1111's automatic VAE revert, option auto_vae_precision); any NaN left is a NaNError, never a black image.

One fp16 export of the tiny model (module fixture, ~30 s); the planted models are copies of it with edited
graphs. The committed fixture is the fp32 export of the same weights (conftest's tiny_diffusers checks that).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdfc.cli import main as sdfc_main
from sdfc.engine import Engine, GenerationRequest, NaNError
from sdfc.engine.hires import HiresFix
from sdfc.engine.models import read_model_info

from .conftest import TINY_MODEL

FP16_COMPONENTS = {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp16", "vae_encoder": "fp16"}
# The second convolution of the VAE decoder's first mid-block ResNet: its output feeds only that block's
# GroupNorm (norm2), which divides any scale out again; the residual path does not see it.
PLANTED_CONV = "decoder.mid_block.resnets.0.conv1"
# A power of two, so scaling is exact in fp16 and fp32: the conv's largest weight (0.042) becomes 1.1e4, still
# an ordinary fp16 value, but its outputs (up to a few units before) pass 65504, fp16's largest finite value.
PLANT_SCALE = 2.0 ** 18


def export(*args) -> int:
    return sdfc_main(["export", *map(str, args)])


def manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / "sdfc.json").read_text())


def write_manifest(model_dir: Path, data: dict) -> None:
    (model_dir / "sdfc.json").write_text(json.dumps(data, indent=2))


def session(path: Path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def input_types(path: Path) -> dict[str, str]:
    return {i.name: i.type for i in session(path).get_inputs()}


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a red house", width=64, height=64, steps=8, sampler_name="Euler", seed=3)
    return GenerationRequest(**{**base, **kw})


def latent(seed: int = 0, shape=(1, 4, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rewrite_graph(path: Path, edit) -> None:
    """Apply `edit(model)` to an ONNX file, saving it with its weights embedded (tiny models only)."""
    import onnx

    model = onnx.load(str(path))  # reads the weights file too
    edit(model)
    data = path.with_name(path.name + "_data")
    onnx.save_model(model, str(path))
    data.unlink(missing_ok=True)


def scale_conv(model, name: str, factor: float) -> None:
    """Multiply a convolution's weight and bias by `factor`, each kept in its own dtype."""
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        if tensor.name in (f"{name}.weight", f"{name}.bias"):
            array = numpy_helper.to_array(tensor)
            scaled = (array.astype(np.float32) * np.float32(factor)).astype(array.dtype)
            assert np.isfinite(scaled).all()
            tensor.CopyFrom(numpy_helper.from_array(scaled, tensor.name))


def store_as_fp16(model, name: str) -> None:
    """Make the output of the node that reads `name`.weight pass through float32 and back to float16.

    The graph already types that tensor fp16, but onnxruntime's CPU provider has no fp16 Conv or GroupNorm and
    runs such chains in float32 between its own casts, so an fp16 graph rarely overflows on CPU where a GPU,
    which stores each activation in fp16, does. The explicit round trip (an identity by the graph's types)
    keeps the activation in fp16 there, as a GPU would."""
    from onnx import TensorProto, helper

    nodes = list(model.graph.node)
    conv = next(n for n in nodes if f"{name}.weight" in n.input)
    out = conv.output[0]
    for node in nodes:
        node.input[:] = [out + "_as_fp16" if i == out else i for i in node.input]
    at = nodes.index(conv) + 1
    model.graph.node.insert(at, helper.make_node("Cast", [out], [out + "_as_fp32"], to=TensorProto.FLOAT))
    model.graph.node.insert(at + 1, helper.make_node("Cast", [out + "_as_fp32"], [out + "_as_fp16"],
                                                     to=TensorProto.FLOAT16))


def nan_where_above(model, threshold: float) -> None:
    """The graph's first output gets NaN wherever it exceeds `threshold` (a partial NaN)."""
    from onnx import helper, numpy_helper

    out = model.graph.output[0]
    dtype = np.float16 if out.type.tensor_type.elem_type == 10 else np.float32
    for node in model.graph.node:
        node.output[:] = [o + "_raw" if o == out.name else o for o in node.output]
    model.graph.initializer.extend([numpy_helper.from_array(np.array(threshold, dtype), "nan_threshold"),
                                    numpy_helper.from_array(np.array(np.nan, dtype), "nan_value")])
    model.graph.node.extend([
        helper.make_node("Greater", [out.name + "_raw", "nan_threshold"], ["nan_mask"]),
        helper.make_node("Where", ["nan_mask", "nan_value", out.name + "_raw"], [out.name])])


# ---------------------------------------------------------------- the export

@pytest.fixture(scope="module")
def fp16_model(tiny_diffusers, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("precision") / "tiny-fp16"
    assert export("diffusers", tiny_diffusers, "--out", out, "--precision", "fp16", "--name", "tiny-fp16",
                  "--no-validate") == 0
    return out


def test_fp16_export_keeps_the_timestep_float32_and_declares_each_precision(fp16_model):
    assert input_types(fp16_model / "unet" / "model.onnx") == {
        "sample": "tensor(float16)", "timestep": "tensor(float)", "encoder_hidden_states": "tensor(float16)"}
    assert input_types(fp16_model / "vae_decoder" / "model.onnx") == {"latent_sample": "tensor(float16)"}
    assert input_types(fp16_model / "vae_decoder_fp32" / "model.onnx") == {"latent_sample": "tensor(float)"}
    data = manifest(fp16_model)
    assert data["precision"] == "fp16"
    assert data["component_precision"] == FP16_COMPONENTS
    assert data["fp32_fallback"] == {"vae_decoder": "vae_decoder_fp32"}
    info = read_model_info(fp16_model)
    assert info.precision_of("vae_decoder") == "fp16" and info.fp32_fallback_of("vae_decoder") == "vae_decoder_fp32"
    # The fallback is what an fp32 export writes: the committed fp32 fixture's decoder, output for output.
    z = {"latent_sample": latent()}
    fallback = session(fp16_model / "vae_decoder_fp32" / "model.onnx").run(None, z)[0]
    fp32 = session(TINY_MODEL / "vae_decoder" / "model.onnx").run(None, z)[0]
    assert np.abs(fallback - fp32).max() <= 1e-6
    # A manifest without per-component entries (older exports) means its one precision everywhere.
    assert read_model_info(TINY_MODEL).precision_of("vae_decoder") == "fp32"


def test_memory_estimates_use_each_parts_precision(fp16_model):
    fp16, fp32 = read_model_info(fp16_model).memory, read_model_info(TINY_MODEL).memory
    assert (fp32.dtype_bytes, fp32.vae_dtype_bytes) == (4, 4)
    # The UNet's activations are fp16; the VAE's are budgeted at fp32, since any decode may be retried in fp32.
    assert (fp16.dtype_bytes, fp16.vae_dtype_bytes) == (2, 4)
    assert fp16.request_bytes(512, 512) < fp32.request_bytes(512, 512)


def test_fractional_timesteps_reach_the_fp16_unet_unrounded(fp16_model):
    from sdfc.engine import samplers, schedules

    fp16, fp32 = Engine(fp16_model).load(), Engine(TINY_MODEL).load()
    euler = samplers.find_sampler("Euler")
    sigmas = schedules.find_schedule(euler.default_schedule).sigmas(20, fp32.sigmas)
    timesteps = [float(fp32.sigmas.sigma_to_t(s)) for s in sigmas if s > 0]
    # Euler's timestep that fp16 would move most (fp16 spaces values 0.5 apart above 512).
    t = max(timesteps, key=lambda v: abs(v - float(np.float16(v))))
    rounded = float(np.float16(t))
    assert abs(t - rounded) >= 0.1, (t, rounded)
    x, context = latent(1, (2, 4, 8, 8)), np.random.default_rng(2).standard_normal((2, 77, 32)).astype(np.float32)
    fractional = fp16.unet(x, t, context)
    fp16_noise = np.abs(fractional - fp32.unet(x, t, context)).max()
    rounding = np.abs(fp16.unet(x, rounded, context) - fractional).max()
    # The timestep's fraction moves the fp16 UNet's output several times more than fp16 itself does (measured
    # 7e-3 against 9e-4): had the engine or the graph rounded t to fp16, `rounding` would be 0.
    assert rounding > 3 * fp16_noise, (rounding, fp16_noise)


def test_euler_on_the_fp16_export_stays_close_to_fp32(fp16_model):
    # Whole images: 20 Euler steps of fp16 rounding, decoded (measured 6e-4 on [0, 1] pixels). The bound is one
    # 8-bit level (1/255), as in test_export: a served PNG differs by at most one count from the fp32 one,
    # while a precision bug (a wrong cast, a rounded timestep on a real model) moves pixels by tenths.
    req = request(steps=20)
    a = Engine(TINY_MODEL).generate(req).float_images[0]
    b = Engine(fp16_model).generate(req).float_images[0]
    assert np.abs(a - b).max() <= 1 / 255


def test_each_input_is_fed_in_its_own_dtype():
    """Any input name, any mix of float types (an SDXL UNet's text_embeds and time_ids included)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sdfc.engine.precision import input_dtypes, typed_feeds

    graph = helper.make_graph(
        [helper.make_node("Cast", ["text_embeds"], ["a"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["steps"], ["b"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a", "time_ids"], ["c"]), helper.make_node("Add", ["c", "b"], ["out"])],
        "mixed", [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT16, [2]),
                  helper.make_tensor_value_info("time_ids", TensorProto.FLOAT, [2]),
                  helper.make_tensor_value_info("steps", TensorProto.INT32, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = typed_feeds(s, {"text_embeds": np.array([1.5, 2.25], np.float32),
                            "time_ids": np.array([1024.0, 0.5], np.float64),
                            "steps": np.array([1, 2], np.int64)})
    assert {k: v.dtype for k, v in feeds.items()} == {"text_embeds": np.float16, "time_ids": np.float32,
                                                      "steps": np.int32}
    assert s.run(None, feeds)[0].tolist() == [1026.5, 4.75]
    assert input_dtypes(s) is input_dtypes(s)  # read once per session


def test_timestep_surgery_casts_in_front_of_any_other_consumer(tmp_path):
    """A graph whose fp16 timestep feeds an fp16 op directly gets a Cast there: still valid, same result."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from models_export.precision import keep_timestep_float32

    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["timestep", "axes"], ["t1"]),
         helper.make_node("Mul", ["t1", "half"], ["out"])],
        "t", [helper.make_tensor_value_info("timestep", TensorProto.FLOAT16, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [1])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes"),
         numpy_helper.from_array(np.array([0.5], np.float16), "half")])
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    assert keep_timestep_float32(path) == 0  # no Cast changed: one inserted before the Mul
    assert input_types(path) == {"timestep": "tensor(float)"}
    assert session(path).run(None, {"timestep": np.array(3.0, np.float32)})[0].tolist() == [1.5]


# ---------------------------------------------------------------- the planted overflow and the revert

@pytest.fixture(scope="module")
def planted(fp16_model, tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the fp16 export whose fp16 VAE decoder overflows, the same model decoding with its fp32 decoder).

    Both decoders get the planted convolution scaled by PLANT_SCALE: the next GroupNorm divides the scale
    out, so the fp32 decoder's images do not change (checked below), while in fp16 the activations overflow."""
    root = tmp_path_factory.mktemp("planted")
    overflowing = root / "tiny-fp16-overflow"
    shutil.copytree(fp16_model, overflowing)
    rewrite_graph(overflowing / "vae_decoder" / "model.onnx",
                  lambda m: (scale_conv(m, PLANTED_CONV, PLANT_SCALE), store_as_fp16(m, PLANTED_CONV)))
    rewrite_graph(overflowing / "vae_decoder_fp32" / "model.onnx", lambda m: scale_conv(m, PLANTED_CONV, PLANT_SCALE))
    data = manifest(overflowing)
    data["name"] = "tiny-fp16-overflow"
    write_manifest(overflowing, data)
    # The reference: the same UNet and text encoder, its decoder the planted fp32 one, declared fp32.
    reference = root / "tiny-fp32-vae"
    shutil.copytree(overflowing, reference)
    shutil.rmtree(reference / "vae_decoder")
    (reference / "vae_decoder_fp32").rename(reference / "vae_decoder")
    data = {**manifest(overflowing), "name": "tiny-fp32-vae",
            "component_precision": {**FP16_COMPONENTS, "vae_decoder": "fp32"}}
    del data["fp32_fallback"]
    write_manifest(reference, data)
    return overflowing, reference


def test_the_planted_overflow_is_fp16_only(planted, fp16_model):
    overflowing, _ = planted
    z = latent(4)
    fp16_out = session(overflowing / "vae_decoder" / "model.onnx").run(None, {"latent_sample": z.astype(np.float16)})[0]
    assert not np.isfinite(fp16_out).any()
    planted_fp32 = session(overflowing / "vae_decoder_fp32" / "model.onnx").run(None, {"latent_sample": z})[0]
    original_fp32 = session(fp16_model / "vae_decoder_fp32" / "model.onnx").run(None, {"latent_sample": z})[0]
    assert np.abs(planted_fp32 - original_fp32).max() <= 1e-4


def test_an_overflowing_fp16_vae_is_decoded_again_in_fp32_and_logged_once(planted, caplog):
    overflowing, reference = planted
    engine = Engine(overflowing)
    with caplog.at_level(logging.WARNING, logger="sdfc.engine"):
        first = engine.generate(request(batch_size=2))  # two decodes
        second = engine.generate(request(seed=4))
    expected = Engine(reference).generate(request(batch_size=2)).float_images + \
        Engine(reference).generate(request(seed=4)).float_images
    for got, want in zip(first.float_images + second.float_images, expected, strict=True):
        assert np.abs(got - want).max() <= 1e-4
        assert got.max() > 0.1  # an image, not black
    reverts = [r for r in caplog.records if "NaNs was produced in VAE" in r.getMessage()]
    assert len(reverts) == 1, [r.getMessage() for r in caplog.records]
    assert "tiny-fp16-overflow" in reverts[0].getMessage() and "auto_vae_precision" in reverts[0].getMessage()


def test_the_revert_covers_the_hires_and_img2img_decodes(planted):
    from PIL import Image

    overflowing, reference = planted
    # Pixel upscalers decode the first pass before the second (hires.py); the last decode is the pipeline's.
    hires = request(hires=HiresFix(scale=1.5, upscaler="Lanczos", second_pass_steps=3, denoising_strength=0.5))
    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    img2img = request(init_images=[init], denoising_strength=0.6)
    for req in (hires, img2img):
        got = Engine(overflowing).generate(req).float_images[0]
        want = Engine(reference).generate(req).float_images[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def test_with_the_revert_off_an_overflow_is_a_clear_error(planted):
    overflowing, _ = planted
    with pytest.raises(NaNError, match=r"NaNs.*VAE.*tiny-fp16-overflow.*16-bit.*auto_vae_precision"):
        Engine(overflowing).generate(request(auto_vae_precision=False))


def test_an_fp16_vae_without_an_fp32_decoder_cannot_revert(planted, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(planted[0], older)
    data = manifest(older)
    del data["fp32_fallback"]  # as exports before per-component precision were
    write_manifest(older, data)
    with pytest.raises(NaNError, match="no 32-bit float VAE decoder"):
        Engine(older).generate(request())


# ---------------------------------------------------------------- partial NaN is an error, never a black image

def test_a_latent_with_one_nan_is_an_error():
    engine = Engine(TINY_MODEL)
    z = latent(6)[0]
    z[2, 3, 4] = np.nan
    with pytest.raises(NaNError, match="1 NaN or infinite values"):
        engine._decode(engine.load(), z)


@pytest.fixture(scope="module")
def partial_nan_vae(tmp_path_factory) -> Path:
    """The fp32 fixture with a decoder that puts NaN on its brightest values only."""
    model = tmp_path_factory.mktemp("partial-vae") / "tiny-sd"
    shutil.copytree(TINY_MODEL, model)
    z = {"latent_sample": latent(7) / np.float32(0.18215)}
    decoded = session(TINY_MODEL / "vae_decoder" / "model.onnx").run(None, z)[0]
    threshold = float(np.quantile(decoded, 0.99))
    rewrite_graph(model / "vae_decoder" / "model.onnx", lambda m: nan_where_above(m, threshold))
    poisoned = session(model / "vae_decoder" / "model.onnx").run(None, z)[0]
    assert 0 < np.isnan(poisoned).sum() < poisoned.size // 10  # partial: A1111's all-NaN check misses it
    return model


def test_a_partial_nan_from_an_fp32_vae_is_an_error(partial_nan_vae):
    with pytest.raises(NaNError, match=r"NaNs \(or infinities: \d+ of \d+ values\).*32-bit float VAE"):
        Engine(partial_nan_vae).generate(request())


def test_nans_left_after_the_fp32_retry_are_an_error(planted, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(planted[0], broken)
    rewrite_graph(broken / "vae_decoder_fp32" / "model.onnx", lambda m: nan_where_above(m, 0.5))
    with pytest.raises(NaNError, match="again .* in 32-bit floats"):
        Engine(broken).generate(request())


def test_a_partial_nan_from_the_unet_is_an_error(tmp_path):
    from onnx import helper, numpy_helper

    def nan_at_one_value(m):  # ε + a constant that is NaN at one latent value (8x8 latents: 64x64 images)
        out = m.graph.output[0].name
        for node in m.graph.node:
            node.output[:] = [o + "_raw" if o == out else o for o in node.output]
        poison = np.zeros((1, 4, 8, 8), np.float32)
        poison[0, 1, 2, 3] = np.nan
        m.graph.initializer.append(numpy_helper.from_array(poison, "poison"))
        m.graph.node.append(helper.make_node("Add", [out + "_raw", "poison"], [out]))

    model = tmp_path / "tiny-sd"
    shutil.copytree(TINY_MODEL, model)
    rewrite_graph(model / "unet" / "model.onnx", nan_at_one_value)
    # One Euler step: the latent has exactly that one NaN (A1111's all-NaN check would pass it to the VAE).
    with pytest.raises(NaNError, match=r"NaNs \(or infinities: 1 of 256 values\).*UNet"):
        Engine(tmp_path).generate(request(steps=1))


# ---------------------------------------------------------------- export options

def test_default_vae_precision_per_architecture():
    from models_export.precision import default_vae_precision

    assert default_vae_precision("sd1", "fp16") == "fp16"
    assert default_vae_precision("sd2", "fp16") == "fp16"
    assert default_vae_precision("sdxl", "fp16") == "fp32"  # SDXL's fp16 VAE overflows on ordinary images
    assert default_vae_precision("sdxl-refiner", "fp16") == "fp32"
    assert default_vae_precision("sdxl", "fp32") == "fp32"


def test_an_fp16_vae_in_an_fp32_export_is_refused(tiny_diffusers, tmp_path, capsys):
    assert export("diffusers", tiny_diffusers, "--out", tmp_path / "x", "--vae-precision", "fp16",
                  "--no-validate") == 2
    assert "--vae-precision fp16 needs --precision fp16" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_vae_precision_fp32_keeps_the_vae_of_an_fp32_export(tiny_diffusers, tmp_path):
    out = tmp_path / "tiny-fp16-vae32"
    assert export("diffusers", tiny_diffusers, "--out", out, "--precision", "fp16", "--vae-precision", "fp32",
                  "--no-validate") == 0
    assert manifest(out)["component_precision"] == {**FP16_COMPONENTS, "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert "fp32_fallback" not in manifest(out) and not (out / "vae_decoder_fp32").exists()
    assert input_types(out / "unet" / "model.onnx")["timestep"] == "tensor(float)"
    feeds = {"vae_decoder": {"latent_sample": latent()},
             "vae_encoder": {"sample": np.random.default_rng(8).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)}}
    for component, feed in feeds.items():
        ours = session(out / component / "model.onnx").run(None, feed)[0]
        fp32 = session(TINY_MODEL / component / "model.onnx").run(None, feed)[0]
        assert ours.dtype == np.float32 and np.abs(ours - fp32).max() <= 1e-6, component
    # With an fp32 VAE, the image differs from the fp32 model's only by the fp16 UNet and text encoder.
    req = request(steps=20)
    a, b = Engine(TINY_MODEL).generate(req).float_images[0], Engine(out).generate(req).float_images[0]
    assert np.abs(a - b).max() <= 1 / 255


def test_over_http_the_option_reaches_the_engine_and_a_nan_answers_with_its_reason(planted, tmp_path):
    """A real server on the overflowing model: reverted by default; with auto_vae_precision off for one request,
    A1111's 500 NansException with the engine's reason (never a black image)."""
    import requests

    from .live_server import PASSWORD, USER, start_server

    overflowing, _ = planted
    server = start_server(tmp_path, env={"SDFC_MODELS_DIR": str(overflowing)})
    try:
        body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}
        ok = requests.post(server.url + "/sdapi/v1/txt2img", json=body, auth=(USER, PASSWORD), timeout=120)
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1
        off = requests.post(server.url + "/sdapi/v1/txt2img", auth=(USER, PASSWORD), timeout=120,
                            json={**body, "override_settings": {"auto_vae_precision": False}})
        assert off.status_code == 500 and off.json()["error"] == "NansException"
        assert "auto_vae_precision" in off.json()["detail"] and "VAE" in off.json()["detail"]
    finally:
        server.stop()
