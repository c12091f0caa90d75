"""Tiling (A1111's `tiling: true`): seamless images from circular UNet and VAE convolutions.

A1111 sets `padding_mode = 'circular'` on every `torch.nn.Conv2d` of the model; sdfc rewrites the ONNX graphs
(sdfc/engine/tiling.py). Proven here: one rewritten Conv equals torch's circular Conv2d; the whole tiled
pipeline equals diffusers' UNet and VAE with every Conv2d circular (same noise, ≤ 1e-4); the images wrap;
tiling off is untouched; and the A1111 API test's tiling request works over a real socket.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from sdfc.engine import Engine, GenerationRequest
from sdfc.engine import tiling
from sdfc.engine.rng import ImageRNG
from sdfc.engine.samplers import img2img_steps

from .conftest import MODELS_DIR, TINY_MODEL
from .live_server import PASSWORD, USER, start_server
from .reference import ReferencePipeline

TOLERANCE = 1e-4
SIZE, STEPS, CFG = 64, 20, 7.5
PROMPT, NEGATIVE = "a tiled floor, mosaic", "blurry"


# ---- (3) one rewritten Conv equals torch's circular Conv2d ---------------------------------------------

def _conv_graph(weight, bias, pads, strides=(1, 1), dilations=(1, 1), opset=18, dtype=TensorProto.FLOAT,
                twice=False):
    """x → Conv (→ a second Conv reading the same x, when `twice`) with dynamic spatial dims."""
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    attrs = dict(kernel_shape=list(weight.shape[2:]), pads=list(pads), strides=list(strides),
                 dilations=list(dilations))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)]
    dims = ["N", "C", "H", "W"][:weight.ndim]
    outputs = [helper.make_tensor_value_info("y", dtype, ["N", "K", *dims[2:]])]
    if twice:
        nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["y2"], name="conv2", **attrs))
        outputs.append(helper.make_tensor_value_info("y2", dtype, ["N", "K", *dims[2:]]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", dtype, dims)],
                              outputs, inits)
    # IR version 8, as the exported models (newer onnx writes one that onnxruntime 1.31 does not read).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _torch_circular(x, weight, bias, padding, stride=1, dilation=1):
    conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], stride=stride, padding=padding,
                           dilation=dilation, padding_mode="circular")
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        conv.bias.copy_(torch.from_numpy(bias))
        return conv(torch.from_numpy(x)).numpy()


CONV_CASES = [  # kernel, torch padding (h, w), stride, dilation, opset
    ((3, 3), (1, 1), 1, 1, 18),
    ((3, 3), (1, 1), 2, 1, 18),      # the UNet's downsamplers
    ((5, 3), (2, 1), 1, 1, 13),      # uneven pads, an older opset (Slice + Concat work for any)
    ((3, 3), (2, 2), 1, 2, 18),      # dilated
    ((7, 7), (3, 3), 1, 1, 19),
]


@pytest.mark.parametrize("kernel,padding,stride,dilation,opset", CONV_CASES)
def test_rewritten_conv_equals_torch_circular_conv(kernel, padding, stride, dilation, opset):
    rng = np.random.default_rng(0)
    # Scaled by 1/sqrt(fan-in) as a trained network's: outputs of about 1, where float32 rounds to ~1e-7.
    weight = (rng.standard_normal((4, 3, *kernel)) / np.sqrt(3 * kernel[0] * kernel[1])).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    pads = (padding[0], padding[1], padding[0], padding[1])
    model = _conv_graph(weight, bias, pads, (stride,) * 2, (dilation,) * 2, opset)
    assert tiling.make_circular(model) == 1
    onnx.checker.check_model(model, full_check=True)
    for shape in ((2, 3, 8, 8), (1, 3, 12, 6)):  # one session, several sizes: the pads follow the input
        x = rng.standard_normal(shape).astype(np.float32)
        ours = _run(model, x)[0]
        expected = _torch_circular(x, weight, bias, padding, stride, dilation)
        assert ours.shape == expected.shape
        assert np.abs(ours - expected).max() <= 1e-5
        # ...and it really differs from the zero-padded Conv (the comparison can fail).
        zero = _run(_conv_graph(weight, bias, pads, (stride,) * 2, (dilation,) * 2, opset), x)[0]
        assert np.abs(zero - expected).max() > 0.1


def test_rewritten_fp16_conv_and_shared_input():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    bias = rng.standard_normal(4).astype(np.float16)
    model = _conv_graph(weight, bias, (1, 1, 1, 1), dtype=TensorProto.FLOAT16, twice=True)
    assert tiling.make_circular(model) == 2
    # Two Convs reading the same tensor with the same pads share one wrapped copy: 2 Slice + 1 Concat per axis.
    assert sorted(n.op_type for n in model.graph.node) == ["Concat"] * 2 + ["Conv"] * 2 + ["Slice"] * 4
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float16)
    y, y2 = _run(model, x)
    expected = _torch_circular(x.astype(np.float32), weight.astype(np.float32), bias.astype(np.float32), 1)
    assert y.dtype == np.float16 and np.array_equal(y, y2)
    assert np.abs(y.astype(np.float32) - expected).max() <= 2e-2  # fp16 rounding of sums of 27 products


def test_unpadded_and_1d_convs_are_left_alone():
    weight = np.ones((2, 3, 1, 1), np.float32)
    model = _conv_graph(weight, np.zeros(2, np.float32), (0, 0, 0, 0))
    before = model.SerializeToString()
    assert tiling.make_circular(model) == 0 and model.SerializeToString() == before
    conv1d = _conv_graph(np.ones((2, 3, 3), np.float32), np.zeros(2, np.float32), (1, 1))  # A1111: Conv2d only
    before = conv1d.SerializeToString()
    assert tiling.make_circular(conv1d) == 0 and conv1d.SerializeToString() == before


def test_implicit_padding_is_refused():
    model = _conv_graph(np.ones((2, 3, 3, 3), np.float32), np.zeros(2, np.float32), (1, 1, 1, 1))
    conv = model.graph.node[0]
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("kernel_shape", [3, 3]),
                           helper.make_attribute("auto_pad", "SAME_UPPER")])
    with pytest.raises(tiling.TilingError, match="auto_pad"):
        tiling.make_circular(model)


# ---- the tiny model's graphs: what is rewritten, and how its weights are loaded ----------------------------

def _padded_torch_convs(module) -> int:
    return sum(1 for m in module.modules() if type(m) is torch.nn.Conv2d and any(m.padding))


@pytest.fixture(scope="module")
def circular_reference(tiny_diffusers):
    """diffusers' UNet and VAE with every Conv2d circular, as A1111's `apply_circular(True)` leaves them."""
    reference = ReferencePipeline(tiny_diffusers)
    for module in (reference.unet, reference.vae, reference.text_encoder):
        for m in module.modules():
            if type(m) is torch.nn.Conv2d:
                m.padding_mode = "circular"
    return reference


def test_every_padded_convolution_of_the_model_is_rewritten(circular_reference):
    ref = circular_reference
    expected = {"unet": _padded_torch_convs(ref.unet),
                "vae_decoder": _padded_torch_convs(ref.vae.decoder) + _padded_torch_convs(ref.vae.post_quant_conv),
                "vae_encoder": _padded_torch_convs(ref.vae.encoder) + _padded_torch_convs(ref.vae.quant_conv)}
    assert _padded_torch_convs(ref.text_encoder) == 0  # A1111's patch changes nothing there either
    for component, count in expected.items():
        path = TINY_MODEL / component / "model.onnx"
        graph, changed = tiling.circular_graph_bytes(path)
        assert changed == count > 0
        # The weights stay in the data file: the graph handed to onnxruntime carries none of them.
        loaded = onnx.load_from_string(graph)
        external = [t for t in loaded.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert external and all(not t.raw_data for t in external)
        assert len(graph) < (path.with_name("model.onnx_data").stat().st_size) / 4


@pytest.mark.slow
def test_fp16_model_tiles_as_fp32(tiny_diffusers, tmp_path):
    """An fp16 export: its graphs get the same rewrite (Slice and Concat carry fp16), and its tiled images stay
    within the fp16-vs-fp32 bound of tests/test_export.py (one 8-bit level) of the fp32 tiled ones."""
    from sdfc.cli import main as sdfc_main
    out = tmp_path / "tiny-fp16"
    assert sdfc_main(["export", "diffusers", str(tiny_diffusers), "--out", str(out), "--precision", "fp16",
                      "--name", "tiny-fp16", "--no-validate"]) == 0
    for component in tiling.TILED_COMPONENTS:
        assert tiling.circular_graph_bytes(out / component / "model.onnx")[1] == \
            tiling.circular_graph_bytes(TINY_MODEL / component / "model.onnx")[1]
    req = _request(steps=10, tiling=True)
    fp16 = Engine(out).generate(req).float_images[0]
    fp32 = Engine(MODELS_DIR).generate(req).float_images[0]
    assert np.abs(fp16 - fp32).max() <= 1 / 255
    plain16 = Engine(out).generate(dataclasses.replace(req, tiling=False)).float_images[0]
    assert np.abs(plain16 - fp32).max() > 0.05


def test_tiled_sessions_are_built_on_demand_and_cached():
    engine = Engine(MODELS_DIR)
    model = engine.load()
    engine.generate(_request(steps=2))
    assert not model.tiled_resident  # tiling off never builds them
    view = model.tiled()
    assert model.tiled_resident and model.tiled().sessions["unet"] is view.sessions["unet"]
    assert view.sessions["text_encoder"] is model.sessions["text_encoder"]
    assert view.sessions["unet"] is not model.sessions["unet"]
    profile = model.info.memory
    assert 0 < profile.tiled_weights_bytes < profile.weights_bytes


def test_memory_budget_counts_the_seamless_sessions(monkeypatch):
    from sdfc.engine import memory
    monkeypatch.setattr(memory, "headroom", lambda device="cpu": 8 << 30)
    engine = Engine(MODELS_DIR)
    info = engine.current
    plain = engine.memory_budget(info)
    tiled_cost = int(memory.BUDGET_FRACTION * info.memory.tiled_weights_bytes)
    assert abs(plain - engine.memory_budget(info, tiling=True) - tiled_cost) <= 1  # to be built for this job
    engine.load().tiled()
    assert abs(plain - engine.memory_budget(info) - tiled_cost) <= 1               # resident from now on
    assert engine.memory_budget(info, tiling=True) == engine.memory_budget(info)


def test_seamless_graphs_commute_with_wrap_around_shifts(engine):
    """Circular convolutions make the UNet equivariant to latent shifts by its downsampling step and the VAE
    decoder to any latent shift (8 pixels each): the picture has no edge at all, only a position."""
    model = engine.load().tiled()
    rng = np.random.default_rng(3)
    latent = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 77, model.sessions["unet"].get_inputs()[2].shape[-1])).astype(np.float32)
    shift = 2  # the tiny UNet halves its latent once
    eps = model.unet(latent, 500.0, context)
    eps_shifted = model.unet(np.roll(latent, (shift, -shift), axis=(2, 3)), 500.0, context)
    assert np.abs(eps_shifted - np.roll(eps, (shift, -shift), axis=(2, 3))).max() <= 1e-5
    image = model.vae_decode(latent)
    image_shifted = model.vae_decode(np.roll(latent, (3, 1), axis=(2, 3)))
    assert np.abs(image_shifted - np.roll(image, (24, 8), axis=(2, 3))).max() <= 1e-5
    # Zero padding is not: the same check fails on the ordinary sessions.
    plain = engine.load()
    assert np.abs(plain.vae_decode(np.roll(latent, (3, 1), axis=(2, 3)))
                  - np.roll(plain.vae_decode(latent), (24, 8), axis=(2, 3))).max() > 0.05


# ---- (1) parity with diffusers' circular UNet and VAE ---------------------------------------------------

def _request(**kw):
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                sampler_name="Euler a", seed=321)
    return GenerationRequest(**{**base, **kw})


def _max_diff(ours, theirs):
    assert len(ours) == len(theirs)
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


def _reference(reference, function, schedule, seeds, init_latent=None, t_enc=None):
    rng = ImageRNG((4, SIZE // 8, SIZE // 8), seeds, source="GPU")
    return reference.k_sample(function, PROMPT, NEGATIVE, rng.first(), rng.next, STEPS, CFG, schedule,
                              init_latent=init_latent, t_enc=t_enc)


def test_tiled_txt2img_matches_circular_reference(engine, circular_reference):
    result = engine.generate(_request(tiling=True, batch_size=2))
    expected = _reference(circular_reference, "euler_ancestral", "uniform", [321, 322])
    assert _max_diff(result.float_images, expected) <= TOLERANCE
    plain = engine.generate(_request(batch_size=2))
    assert _max_diff(plain.float_images, result.float_images) > 0.05  # tiling changed the picture


def test_tiled_img2img_matches_circular_reference(engine, circular_reference):
    """img2img also encodes its init image with the circular VAE encoder, as A1111."""
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    result = engine.generate(_request(sampler_name="Euler", seed=11, tiling=True, init_images=[init],
                                      denoising_strength=0.6))
    pixels = np.moveaxis(np.asarray(init, dtype=np.float32) / 255.0, 2, 0)[None] * 2 - 1
    init_latent = circular_reference.encode_image(pixels)
    expected = _reference(circular_reference, "euler", "uniform", [11], init_latent, img2img_steps(STEPS, 0.6))
    assert _max_diff(result.float_images, expected) <= TOLERANCE


# ---- (2) the image wraps; tiling off is unchanged --------------------------------------------------------

def _seam_statistics(images: list[np.ndarray], axis: int):
    """Across the wrap seam (last column → first, or last row → first) and across each interior pair of
    neighbouring columns (rows): the Pearson correlation of the two lines and their mean abs difference,
    over every image and channel. A seam is a place where neighbours stop resembling each other."""
    x = np.moveaxis(np.stack(images).astype(np.float64), axis + 1, 2)  # (B, along, across, 3)

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    n = x.shape[2]
    interior_corr = np.array([corr(x[:, :, j], x[:, :, j + 1]) for j in range(n - 1)])
    interior_diff = np.abs(np.diff(x, axis=2)).mean(axis=(0, 1, 3))
    return corr(x[:, :, -1], x[:, :, 0]), float(np.abs(x[:, :, -1] - x[:, :, 0]).mean()), \
        interior_corr, interior_diff


def test_tiled_images_wrap_around():
    engine = Engine(MODELS_DIR)
    job = _request(sampler_name="Euler", seed=1234, steps=10, batch_size=8)
    tiled = engine.generate(dataclasses.replace(job, tiling=True)).float_images
    plain = engine.generate(job).float_images
    for axis, name in ((1, "left/right"), (0, "top/bottom")):
        seam_corr, seam_diff, interior_corr, interior_diff = _seam_statistics(tiled, axis)
        # Neighbours across the seam are as alike as neighbours inside (interior correlation ~0.82 here)...
        assert seam_corr >= interior_corr.min() and seam_corr >= interior_corr.mean() - 0.1, name
        assert seam_diff <= interior_diff.max(), name
        # ...where without tiling the two edges are unrelated pictures (correlation ~0, measured -0.1..0.12).
        plain_corr, _, plain_interior, _ = _seam_statistics(plain, axis)
        assert plain_corr < 0.3 < plain_interior.mean() - 0.3, name


def test_tiling_off_is_bit_identical_before_and_after_tiled_jobs():
    fresh = Engine(MODELS_DIR).generate(_request(steps=6, batch_size=2))
    engine = Engine(MODELS_DIR)
    engine.generate(_request(steps=6, tiling=True))
    after = engine.generate(_request(steps=6, batch_size=2))
    assert all(np.array_equal(a, b) for a, b in zip(fresh.float_images, after.float_images))


def test_engine_refuses_a_non_boolean_tiling(engine):
    from sdfc.engine import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="tiling"):
        engine.generate(_request(steps=1, tiling="yes"))


# ---- (4) A1111's own tiling request over a real socket ---------------------------------------------------

# A1111 test/test_txt2img.py `simple_txt2img_request`, unchanged; its tiling test sets "tiling": True.
SIMPLE_TXT2IMG_REQUEST = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
    "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
    "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
    "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
    "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("tiling-server"), env={"SDFC_MODELS_DIR": str(MODELS_DIR)})
    yield srv
    srv.stop()


def _post(server, route, body):
    return requests.post(f"{server.url}/sdapi/v1/{route}", json=body, auth=(USER, PASSWORD), timeout=120)


def _images(response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB")) for i in response.json()["images"]]


def test_a1111_txt2img_tiling_request(server):
    r = _post(server, "txt2img", {**SIMPLE_TXT2IMG_REQUEST, "tiling": True})
    assert r.status_code == 200, r.text
    images = _images(r)
    assert len(images) == 1 and images[0].shape == (64, 64, 3)
    info = json.loads(r.json()["info"])
    text = info["infotexts"][0]
    assert ", Tiling: True" in text and r.json()["parameters"]["tiling"] is True
    # The image is the engine's tiled one for the seed the server drew.
    local = Engine(MODELS_DIR).generate(GenerationRequest(
        prompt="example prompt", width=64, height=64, steps=3, cfg_scale=7, sampler_name="Euler a",
        seed=info["seed"], eta=0.0, tiling=True))
    assert np.array_equal(images[0], np.asarray(local.images[0]))
    # Tiling off: no Tiling in the infotext, a different picture for the same seed.
    off = _post(server, "txt2img", {**SIMPLE_TXT2IMG_REQUEST, "seed": info["seed"]})
    assert off.status_code == 200 and "Tiling" not in json.loads(off.json()["info"])["infotexts"][0]
    assert not np.array_equal(_images(off)[0], images[0])


def test_infotext_tiling_is_read_back_as_the_option(server):
    """The infotext alone reproduces a tiled image: "Tiling: True" sets A1111's `tiling` option."""
    first = _post(server, "txt2img", {"prompt": "a tile", "seed": 8, "steps": 3, "width": 64, "height": 64,
                                      "tiling": True})
    text = json.loads(first.json()["info"])["infotexts"][0]
    assert ", Tiling: True" in text
    again = _post(server, "txt2img", {"infotext": text})
    assert again.status_code == 200, again.text
    assert json.loads(again.json()["info"])["infotexts"][0] == text
    assert np.array_equal(_images(again)[0], _images(first)[0])
    bad = _post(server, "txt2img", {"infotext": text.replace("Tiling: True", "Tiling: maybe")})
    assert bad.status_code == 422 and "Tiling" in bad.text


def test_img2img_tiling_and_the_tiling_option(server):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    body = {"init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "x", "steps": 3,
            "denoising_strength": 0.5, "seed": 4, "width": 64, "height": 64}
    on = _post(server, "img2img", {**body, "tiling": True})
    assert on.status_code == 200, on.text
    assert len(_images(on)) == 1 and _images(on)[0].shape == (64, 64, 3)
    assert ", Tiling: True" in json.loads(on.json()["info"])["infotexts"][0]
    # tiling null falls back to the option, as A1111's `p.tiling = opts.tiling`.
    by_option = _post(server, "img2img", {**body, "tiling": None, "override_settings": {"tiling": True}})
    assert by_option.status_code == 200 and np.array_equal(_images(by_option)[0], _images(on)[0])


@pytest.mark.parametrize("value", ["sometimes", 2, [True]])
def test_invalid_tiling_is_a_422(server, value):
    r = _post(server, "txt2img", {**SIMPLE_TXT2IMG_REQUEST, "tiling": value})
    assert r.status_code == 422 and "tiling" in r.text


def test_openapi_documents_tiling_as_supported(server):
    from sdfc.api import payloads
    spec = requests.get(server.url + "/openapi.json", auth=(USER, PASSWORD), timeout=30).json()
    schemas = spec["components"]["schemas"]
    for model in (payloads.TXT2IMG, payloads.IMG2IMG):
        prop = schemas[model.name]["properties"]["tiling"]
        assert "enum" not in prop and "seamless" in prop["description"]
