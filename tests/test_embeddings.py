"""Textual-inversion embeddings (sdfc/engine/embeddings.py): files, prompt placement, parity with diffusers,
and the API surface (/embeddings, /refresh-embeddings, "TI hashes")."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

from sdfc.engine import Engine, GenerationRequest
from sdfc.engine.conditioning import PromptEncoder
from sdfc.engine.embeddings import EmbeddingFileError, read_safetensors
from sdfc.engine.onnx_tensors import read_initializer
from sdfc.engine.prompt_chunks import encode_texts

from .conftest import TINY_MODEL
from .live_server import PASSWORD, USER, start_server

WIDTH = 32  # the tiny model's CLIP width


def vectors(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, (count, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": vectors(3, 1)}, str(root / "tinyemb.safetensors"))
    (root / "sub").mkdir()  # A1111 reads sub-folders too
    save_file({"<concept>": vectors(1, 2)[0]}, str(root / "sub" / "onevec.safetensors"))  # diffusers' layout
    save_file({"emb_params": vectors(2, 3).repeat(2, axis=1)}, str(root / "widerclip.safetensors"))
    save_file({"clip_l": vectors(1, 4), "clip_g": vectors(1, 5)}, str(root / "xlemb.safetensors"))
    (root / "pickled.pt").write_bytes(b"\x80\x04 not loaded")
    return root


@pytest.fixture(scope="module")
def engine_with(folder):
    return Engine(TINY_MODEL.parent, embeddings_dir=folder)


def test_safetensors_reader_matches_the_library_for_each_dtype(tmp_path):
    data = {"a": vectors(2, 7), "b": vectors(1, 8).astype(np.float16)}
    save_file(data, str(tmp_path / "x.safetensors"), metadata={"step": "12"})
    tensors, metadata = read_safetensors(tmp_path / "x.safetensors")
    assert metadata == {"step": "12"}
    np.testing.assert_array_equal(tensors["a"], data["a"])
    np.testing.assert_array_equal(tensors["b"], data["b"].astype(np.float32))
    bf16 = torch.from_numpy(vectors(2, 9)).to(torch.bfloat16)
    save_torch_file({"emb_params": bf16}, str(tmp_path / "bf.safetensors"))
    np.testing.assert_array_equal(read_safetensors(tmp_path / "bf.safetensors")[0]["emb_params"],
                                  bf16.float().numpy())
    (tmp_path / "bad.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(EmbeddingFileError, match="too large"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_the_onnx_reader_finds_the_token_table():
    import onnx
    path = TINY_MODEL / "text_encoder" / "model.onnx"
    model = onnx.load(str(path))
    expected = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                    if t.name == "text_model.embeddings.token_embedding.weight")
    np.testing.assert_array_equal(read_initializer(path, "text_model.embeddings.token_embedding.weight"), expected)


def test_the_folder_is_sorted_into_loaded_and_skipped_as_a1111(engine_with):
    db = engine_with.embeddings_of()
    assert sorted(db.loaded) == ["onevec", "tinyemb"]
    assert sorted(db.skipped) == ["pickled", "widerclip", "xlemb"]  # pickle, another width, SDXL
    assert db.loaded["tinyemb"].listing() == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                              "shape": WIDTH, "vectors": 3}
    assert db.skipped["widerclip"].listing()["shape"] == 2 * WIDTH


def reference_hidden_states(tiny_diffusers, folder, prompt: str) -> np.ndarray:
    """diffusers: load_textual_inversion adds the embedding's tokens to the tokenizer and rows to CLIP."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_diffusers / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(tiny_diffusers / "text_encoder")).eval()
    class Loader(TextualInversionLoaderMixin):  # the mixin's pipeline attributes, for a bare text encoder
        hf_device_map = None
        components = {}

    loader = Loader()
    for name in ("tinyemb", "onevec"):
        path = next(folder.rglob(f"{name}.safetensors"))
        loader.load_textual_inversion(str(path), token=name, tokenizer=tokenizer, text_encoder=text_encoder)
    converted = loader.maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state[0].numpy()


@pytest.mark.parametrize("prompt", ["a photo of tinyemb", "onevec and tinyemb in a garden, red"])
def test_prompt_encoding_equals_diffusers_textual_inversion(engine_with, tiny_diffusers, folder, prompt):
    model = engine_with.load()
    encoder = PromptEncoder(model, emphasis="None")
    ours = encode_texts([prompt], encoder.chunker, model.encode_tokens, "None")[0]
    expected = reference_hidden_states(tiny_diffusers, folder, prompt)
    assert ours.shape == expected.shape == (77, WIDTH)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # and differs from the same words as plain text
    plain = Engine(TINY_MODEL.parent).load()
    as_text = encode_texts([prompt], PromptEncoder(plain, emphasis="None").chunker, plain.encode_tokens, "None")[0]
    assert np.abs(as_text - ours).max() > 1e-2


def test_vectors_take_the_fragment_weight_and_never_straddle_a_chunk(engine_with):
    chunker = PromptEncoder(engine_with.load()).chunker
    ids = engine_with.load().embeddings.ids["tinyemb"]
    chunk = chunker.chunks("a (tinyemb:1.3) b")[0]
    start = chunk.tokens.index(ids[0])
    assert chunk.tokens[start:start + 3] == ids and chunk.multipliers[start:start + 3] == [1.3] * 3
    # 74 words then the 3-vector embedding: it does not fit the first chunk's 75 and starts the second.
    chunks = chunker.chunks(" ".join(["cat"] * 74) + " tinyemb")
    assert len(chunks) == 2 and chunks[0].tokens[1:75] == chunks[0].tokens[1:2] * 74
    assert chunks[1].tokens[1:4] == ids
    assert chunker.used_embeddings == ["tinyemb", "tinyemb"]


def test_an_image_with_an_embedding_reports_its_hash(engine_with, folder):
    req = dict(prompt="tinyemb on a hill", negative_prompt="onevec", width=64, height=64, steps=3, seed=5)
    result = engine_with.generate(GenerationRequest(**req))
    sha = hashlib.sha256((folder / "tinyemb.safetensors").read_bytes()).hexdigest()
    one = hashlib.sha256((folder / "sub" / "onevec.safetensors").read_bytes()).hexdigest()
    assert result.extra_generation_params["TI hashes"] == f"tinyemb: {sha[:12]}, onevec: {one[:12]}"
    plain = Engine(TINY_MODEL.parent).generate(GenerationRequest(**req))
    assert np.abs(result.float_images[0] - plain.float_images[0]).max() > 1e-3
    assert "TI hashes" not in plain.extra_generation_params


def test_the_api_lists_refreshes_and_records_embeddings(tmp_path, folder):
    emb_dir = tmp_path / "emb"
    shutil.copytree(folder, emb_dir)
    server = start_server(tmp_path, env={"SDFC_EMBEDDINGS_DIR": str(emb_dir)})
    auth = (USER, PASSWORD)
    try:
        listed = requests.get(server.url + "/sdapi/v1/embeddings", auth=auth, timeout=30).json()
        assert sorted(listed["loaded"]) == ["onevec", "tinyemb"] and "pickled" in listed["skipped"]
        save_file({"emb_params": vectors(2, 11)}, str(emb_dir / "fresh.safetensors"))
        assert requests.post(server.url + "/sdapi/v1/refresh-embeddings", auth=auth, timeout=30).status_code == 200
        listed = requests.get(server.url + "/sdapi/v1/embeddings", auth=auth, timeout=30).json()
        assert listed["loaded"]["fresh"]["vectors"] == 2
        r = requests.post(server.url + "/sdapi/v1/txt2img", auth=auth, timeout=60, json={
            "prompt": "fresh, tinyemb", "steps": 2, "width": 64, "height": 64, "seed": 1})
        assert r.status_code == 200
        info = json.loads(r.json()["info"])
        sha = hashlib.sha256((emb_dir / "fresh.safetensors").read_bytes()).hexdigest()[:12]
        assert f'TI hashes: "fresh: {sha}, tinyemb: ' in info["infotexts"][0]
        png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert "TI hashes" in png.info["parameters"]
    finally:
        server.stop()
