"""LoRAs (sdfc/engine/lora.py): `<lora:name:w>` in a prompt equals diffusers with the same LoRA fused at w, on the
tiny model; weight 0 is no LoRA; two LoRAs add up; a LoRA for another model is a 4xx; /loras and "Lora hashes"."""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import requests
from PIL import Image
from safetensors.numpy import save_file

from sdfc.engine import Engine, GenerationRequest
from sdfc.engine.lora import LoraError, addnet_hash, parse_networks
from sdfc.engine.rng import ImageRNG

from .conftest import TINY_MODEL
from .live_server import PASSWORD, USER, start_server
from .reference import ReferencePipeline

TOLERANCE = 1e-4
PROMPT, NEGATIVE, STEPS, CFG, SEED = "a photo of a cat", "blurry", 8, 7.0, 321

# Modules a kohya LoRA for SD 1.x targets: attention (Linear), proj_in (1×1 conv here), a resnet's 3×3 conv
# (LoCon), and the text encoder's attention and MLP; (component, module, in, out, kernel).
MODULES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32, None),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 32, 32, None),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", 64, 64, None),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", 128, 32, None),
    ("unet", "down_blocks.0.attentions.0.proj_in", 32, 32, 1),
    ("unet", "down_blocks.1.resnets.0.conv1", 32, 64, 3),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 32, 32, None),
    ("text_encoder", "text_model.encoder.layers.1.mlp.fc1", 32, 128, None),
]
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def lora_modules(seed: int, rank: int, alpha: float, scale: float = 0.3):
    rng = np.random.default_rng(seed)
    for component, module, fan_in, fan_out, kernel in MODULES:
        down_shape = (rank, fan_in) if kernel is None else (rank, fan_in, kernel, kernel)
        up_shape = (fan_out, rank) if kernel is None else (fan_out, rank, 1, 1)
        yield (component, module, rng.normal(0, scale, down_shape).astype(np.float32),
               rng.normal(0, scale, up_shape).astype(np.float32), alpha)


def kohya_lora(seed: int, rank: int = 4, alpha: float = 2.0) -> dict[str, np.ndarray]:
    tensors = {}
    for component, module, down, up, alpha_ in lora_modules(seed, rank, alpha):
        key = KOHYA_PREFIX[component] + module.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.array(alpha_, dtype=np.float32)})
    return tensors


def peft_lora(seed: int, rank: int = 4, alpha: float = 2.0) -> dict[str, np.ndarray]:
    """The same LoRA in diffusers' own (PEFT) layout, alpha/rank folded into lora_B."""
    tensors = {}
    for component, module, down, up, alpha_ in lora_modules(seed, rank, alpha):
        tensors[f"{component}.{module}.lora_A.weight"] = down
        tensors[f"{component}.{module}.lora_B.weight"] = up * np.float32(alpha_ / rank)
    return tensors


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    save_file(kohya_lora(1), str(root / "tinylora.safetensors"), metadata={"ss_output_name": "tiny-style"})
    save_file(kohya_lora(2, rank=2, alpha=1.0), str(root / "second.safetensors"))
    save_file(peft_lora(1), str(root / "tinylora_peft.safetensors"))
    save_file(peft_lora(2, rank=2, alpha=1.0), str(root / "second_peft.safetensors"))
    # made for a model with other module names (LDM-style keys / another architecture)
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": np.zeros((4, 320, 1, 1), np.float32),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": np.zeros((320, 4, 1, 1), np.float32)},
              str(root / "otherarch.safetensors"))
    # right names, wrong shapes (an SD 2 LoRA for the same module path, say)
    key = "lora_unet_" + MODULES[0][1].replace(".", "_")
    wide = {f"{key}.lora_down.weight": np.zeros((4, 1024), np.float32),
            f"{key}.lora_up.weight": np.zeros((32, 4), np.float32)}
    save_file(wide, str(root / "wrongshape.safetensors"))
    return root


@pytest.fixture(scope="module")
def engine(lora_dir):
    return Engine(TINY_MODEL.parent, lora_dir=lora_dir)


def fused_reference(tiny_diffusers, tmp_path_factory, lora_dir, loras: list[tuple[str, float]]) -> ReferencePipeline:
    """diffusers: load_lora_weights + fuse_lora(lora_scale=w) for each LoRA (its PEFT-layout copy: diffusers'
    kohya converter maps the text encoder's self_attn keys to names PEFT does not find), saved and loaded as
    the reference."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("fused")
    shutil.copytree(tiny_diffusers, out, dirs_exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_diffusers), safety_checker=None,
                                                   requires_safety_checker=False)
    for name, weight in loras:
        pipe.load_lora_weights(str(lora_dir), weight_name=f"{name}_peft.safetensors", adapter_name=name)
        pipe.fuse_lora(lora_scale=weight, adapter_names=[name])
        pipe.unload_lora_weights()
    pipe.unet.save_pretrained(str(out / "unet"))
    pipe.text_encoder.save_pretrained(str(out / "text_encoder"))
    return ReferencePipeline(out)


def reference_image(reference) -> np.ndarray:
    rng = ImageRNG((4, 8, 8), [SEED], source="GPU")
    return reference.k_sample("euler", PROMPT, NEGATIVE, rng.first(), rng.next, STEPS, CFG, "uniform")[0]


def generate(engine, prompt: str):
    return engine.generate(GenerationRequest(prompt=prompt, negative_prompt=NEGATIVE, width=64, height=64,
                                             steps=STEPS, cfg_scale=CFG, sampler_name="Euler", seed=SEED))


def test_a_lora_equals_diffusers_with_it_fused(engine, tiny_diffusers, tmp_path_factory, lora_dir):
    expected = reference_image(fused_reference(tiny_diffusers, tmp_path_factory, lora_dir, [("tinylora", 0.7)]))
    result = generate(engine, f"{PROMPT} <lora:tinylora:0.7>")
    assert np.abs(result.float_images[0] - expected).max() <= TOLERANCE
    plain = generate(engine, PROMPT)
    assert np.abs(plain.float_images[0] - expected).max() > 1e-2  # the LoRA changes the image
    peft = generate(engine, f"{PROMPT} <lora:tinylora_peft:0.7>")  # diffusers' layout reads the same
    assert np.abs(peft.float_images[0] - expected).max() <= TOLERANCE
    assert result.extra_generation_params["Lora hashes"] == \
        f"tiny-style: {addnet_hash(lora_dir / 'tinylora.safetensors')[:12]}"


def test_two_loras_add_up_as_in_diffusers(engine, tiny_diffusers, tmp_path_factory, lora_dir):
    expected = reference_image(fused_reference(tiny_diffusers, tmp_path_factory, lora_dir,
                                               [("tinylora", 0.5), ("second", -0.8)]))
    # the alias from the file's metadata names it as well as the file name
    result = generate(engine, f"<lora:tiny-style:0.5>{PROMPT}<lora:second:-0.8>")
    assert np.abs(result.float_images[0] - expected).max() <= TOLERANCE


def test_weight_zero_is_no_lora_and_te_unet_split(engine):
    plain = generate(engine, PROMPT)
    assert np.array_equal(generate(engine, f"{PROMPT}<lora:tinylora:0>").float_images[0], plain.float_images[0])
    te_only = generate(engine, f"{PROMPT}<lora:tinylora:1:0>").float_images[0]
    unet_only = generate(engine, f"{PROMPT}<lora:tinylora:0:unet=1>").float_images[0]
    assert not np.array_equal(te_only, plain.float_images[0]) and not np.array_equal(unet_only, te_only)


@pytest.mark.parametrize("prompt,message", [
    ("<lora:otherarch:1> x", "does not fit this model"),
    ("<lora:wrongshape:1> x", "does not fit this model"),
    ("<lora:missing:1> x", "not found"),
    ("<lora:tinylora:abc> x", "not a number"),
    ("<lora:tinylora:1e9> x", "multiplier"),
    ("<hypernet:foo:1> x", "not supported"),
])
def test_bad_loras_are_refused_with_the_reason(engine, prompt, message):
    with pytest.raises(LoraError, match=message):
        generate(engine, prompt)


def test_tags_are_parsed_as_a1111():
    uses = parse_networks("a <lora:x:0.5> b <lora:y:0.3:0.9> <lora:z:te=0.2:unet=0.4> <lora:w>")
    assert [(u.name, u.te, u.unet) for u in uses] == [("x", 0.5, 0.5), ("y", 0.3, 0.9), ("z", 0.2, 0.4),
                                                      ("w", 1.0, 1.0)]


def test_loras_through_the_api(tmp_path, lora_dir):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(lora_dir / "tinylora.safetensors", folder)
    server = start_server(tmp_path, env={"SDFC_LORA_DIR": str(folder)})
    auth = (USER, PASSWORD)
    try:
        listed = requests.get(server.url + "/sdapi/v1/loras", auth=auth, timeout=30).json()
        assert listed == [{"name": "tinylora", "alias": "tiny-style", "path": "tinylora.safetensors",
                           "metadata": {"ss_output_name": "tiny-style"}}]
        body = {"prompt": "<lora:second:0.6> cat", "steps": 2, "width": 64, "height": 64, "seed": 3}
        r = requests.post(server.url + "/sdapi/v1/txt2img", auth=auth, json=body, timeout=60)
        assert r.status_code == 400 and "not found" in r.json()["detail"]  # refused before it queues
        shutil.copy(lora_dir / "second.safetensors", folder)
        assert requests.post(server.url + "/sdapi/v1/refresh-loras", auth=auth, timeout=30).status_code == 200
        r = requests.post(server.url + "/sdapi/v1/txt2img", auth=auth, json=body, timeout=60)
        assert r.status_code == 200
        text = json.loads(r.json()["info"])["infotexts"][0]
        assert text.startswith("<lora:second:0.6> cat\n")  # the prompt keeps its tag, as in A1111
        assert f'Lora hashes: "second: {addnet_hash(folder / "second.safetensors")[:12]}"' in text
        png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert "Lora hashes" in png.info["parameters"]
        shutil.copy(lora_dir / "otherarch.safetensors", folder)
        requests.post(server.url + "/sdapi/v1/refresh-loras", auth=auth, timeout=30)
        r = requests.post(server.url + "/sdapi/v1/txt2img", auth=auth, timeout=60,
                          json={**body, "prompt": "<lora:otherarch:1> cat"})
        assert r.status_code == 400 and "does not fit" in r.json()["detail"]
    finally:
        server.stop()


def test_the_tiny_fixture_maps_every_lora_target(tiny_onnx):
    maps = {c: json.loads((tiny_onnx / c / "weights_map.json").read_text())["weights"] for c in ("unet", "text_encoder")}
    assert maps["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]["transpose"] is True
    assert maps["unet"]["down_blocks.1.resnets.0.conv1.weight"] == {"initializer": "down_blocks.1.resnets.0.conv1.weight",
                                                                   "transpose": False}
    assert "text_model.encoder.layers.1.mlp.fc1.weight" in maps["text_encoder"]
