"""A1111's synchronous textual-inversion routes over a real socket: POST /sdapi/v1/create/embedding writes the
served model's token vectors of the init text, spread over the vectors as A1111 spreads them (checked against the
diffusers model the ONNX fixture was exported from), and lists it at once; POST /sdapi/v1/train/embedding
continues that embedding (the same vectors as the library trainer started from them), counts its steps on from
the file's, writes it back and answers A1111's info strings; hostile or unhonourable fields are 4xx before
anything trains."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from .live_server import PASSWORD, USER, start_server
from .test_training import make_images

torch = pytest.importorskip("torch")

NAME, INIT = "apiemb", "red cat"  # two tokens over three vectors: A1111 gives tokens 0, 0, 1
SEED, LR, STEPS = 3, 0.05, 4


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_diffusers):
    root = tmp_path_factory.mktemp("a1111-train")
    training = root / "training"
    shutil.copytree(tiny_diffusers, training / "models" / "tiny")
    make_images(training / "images" / "checkers")
    embeddings = root / "embeddings"
    server = start_server(root, env={"SDFC_TRAINING_DIR": str(training), "SDFC_EMBEDDINGS_DIR": str(embeddings),
                                     "OMP_NUM_THREADS": "1"})
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    yield server, session, training, embeddings
    server.stop()


def vectors(path: Path) -> tuple[np.ndarray, dict]:
    from safetensors import safe_open
    with safe_open(str(path), "np") as fh:
        return fh.get_tensor("emb_params"), fh.metadata()


def train_body(**overrides) -> dict:
    body = {"embedding_name": NAME, "learn_rate": str(LR), "batch_size": 1, "gradient_step": 1,
            "data_root": "images/checkers", "log_directory": "", "training_width": 64, "training_height": 64,
            "varsize": False, "steps": STEPS, "clip_grad_mode": "disabled", "clip_grad_value": 0.1,
            "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once", "use_weight": False,
            "create_image_every": 0, "save_embedding_every": 0, "template_filename": "",
            "preview_prompt": "", "preview_steps": 20, "preview_sampler_name": "Euler a", "base": "models/tiny",
            "seed": SEED}
    body.update(overrides)
    return body


def test_create_then_train_as_a1111(served, tiny_diffusers):
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdfc.training.embedding_trainer import EmbeddingTrainingConfig, train_embedding

    server, s, training, embeddings = served
    url = f"{server.url}/sdapi/v1"
    # create: A1111's answer, the file, the vectors A1111 would take, listed at once
    r = s.post(f"{url}/create/embedding", json={"name": NAME, "num_vectors_per_token": 3, "init_text": INIT})
    assert r.status_code == 200 and r.json() == {"info": f"create embedding filename: {NAME}.safetensors"}, r.text
    created, meta = vectors(embeddings / f"{NAME}.safetensors")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_diffusers / "tokenizer")
    table = CLIPTextModel.from_pretrained(tiny_diffusers / "text_encoder").get_input_embeddings().weight
    ids = tokenizer(INIT, add_special_tokens=False).input_ids
    assert len(ids) == 2 and meta["step"] == "0"
    np.testing.assert_array_equal(created, table.detach().numpy()[[ids[0], ids[0], ids[1]]])
    listed = s.get(f"{url}/embeddings").json()["loaded"][NAME]
    assert (listed["vectors"], listed["step"], listed["shape"]) == (3, 0, 32)
    again = s.post(f"{url}/create/embedding", json={"name": NAME, "init_text": ""})
    assert again.json() == {"info": f"create embedding error: file {NAME}.safetensors already exists"}
    zeros = s.post(f"{url}/create/embedding", json={"name": "zeroemb", "num_vectors_per_token": 2, "init_text": ""})
    assert zeros.status_code == 200 and not vectors(embeddings / "zeroemb.safetensors")[0].any()

    # train: continues the created vectors (the library trainer, started from them, gives the same file)
    r = s.post(f"{url}/train/embedding", json=train_body())
    assert r.status_code == 200, r.text
    assert r.json() == {"info": f"train embedding complete: filename: {NAME}.safetensors error: None"}
    trained, meta = vectors(embeddings / f"{NAME}.safetensors")
    assert meta["step"] == str(STEPS) and np.abs(trained - created).max() > 1e-4
    here = train_embedding(EmbeddingTrainingConfig(
        base=training / "models" / "tiny", images=training / "images" / "checkers",
        output=Path(str(server.log_path)).parent / "here" / f"{NAME}.safetensors", num_vectors=3,
        learning_rate=LR, steps=STEPS, resolution=64, buckets=False, seed=SEED, init_vectors=created))
    np.testing.assert_array_equal(trained, vectors(here.path)[0])
    assert s.get(f"{url}/embeddings").json()["loaded"][NAME]["step"] == STEPS
    # steps is the step to reach: two more; then one already passed trains nothing
    r = s.post(f"{url}/train/embedding", json=train_body(steps=STEPS + 2))
    assert r.json()["info"].endswith("error: None")
    more, meta = vectors(embeddings / f"{NAME}.safetensors")
    assert meta["step"] == str(STEPS + 2) and np.abs(more - trained).max() > 0
    r = s.post(f"{url}/train/embedding", json=train_body(steps=2))
    assert r.json() == {"info": f"train embedding complete: filename: {NAME}.safetensors error: None"}
    np.testing.assert_array_equal(vectors(embeddings / f"{NAME}.safetensors")[0], more)


@pytest.mark.parametrize("overrides,status,where", [
    ({"data_root": "../../etc"}, 422, "data_root"),
    ({"data_root": "/etc"}, 422, "data_root"),
    ({"data_root": "nothere"}, 404, "data_root:"),
    ({"base": "images/checkers"}, 400, "base:"),
    ({"template_filename": "style_filewords.txt"}, 422, "template_filename"),
    ({"log_directory": "textual_inversion"}, 422, "log_directory"),
    ({"create_image_every": 5}, 422, "create_image_every"),
    ({"gradient_step": 2}, 422, "gradient_step"),
    ({"learn_rate": "0.005:100, 1e-3:1000"}, 422, "learn_rate"),
    ({"learn_rate": "fast"}, 422, "learn_rate"),
    ({"latent_sampling_method": "random"}, 422, "latent_sampling_method"),
    ({"training_height": 80}, 422, "training_height"),
    ({"steps": 10**6}, 422, "steps"),
    ({"batch_size": 64}, 422, "batch_size"),
    ({"preview_sampler_index": 0}, 422, "preview_sampler_index"),  # a field sdfc does not know
    ({"embedding_name": "nosuch"}, 404, "embedding_name:"),
    ({"embedding_name": "../x"}, 422, "embedding_name"),
])
def test_train_refuses_what_it_cannot_honour(served, overrides, status, where):
    server, s, _, embeddings = served
    if not (embeddings / f"{NAME}.safetensors").exists():
        s.post(f"{server.url}/sdapi/v1/create/embedding", json={"name": NAME, "init_text": INIT,
                                                                 "num_vectors_per_token": 3})
    before = (embeddings / f"{NAME}.safetensors").read_bytes()
    r = s.post(f"{server.url}/sdapi/v1/train/embedding", json=train_body(**overrides))
    assert r.status_code == status, r.text
    if status == 422:
        assert where in [d["loc"][-1] for d in r.json()["detail"]], r.text
    else:
        assert r.json()["detail"].startswith(where), r.text
    assert (embeddings / f"{NAME}.safetensors").read_bytes() == before


def test_create_refuses_hostile_fields(served):
    server, s, _, _ = served
    for body, loc in (({"name": "../evil"}, "name"),
                      ({"name": "x", "num_vectors_per_token": 76}, "num_vectors_per_token"),
                      ({"name": "x", "init_text": "a" * 201}, "init_text"), ({}, "name"),
                      ({"name": "x", "hypernetwork": 1}, "hypernetwork")):
        r = s.post(f"{server.url}/sdapi/v1/create/embedding", json=body)
        assert r.status_code == 422 and loc in [d["loc"][-1] for d in r.json()["detail"]], r.text
    # the hypernetwork routes stay unimplemented, and both embedding routes are documented
    assert s.post(f"{server.url}/sdapi/v1/train/hypernetwork", json={}).status_code == 501
    paths = s.get(f"{server.url}/openapi.json").json()["paths"]
    assert "requestBody" in paths["/sdapi/v1/train/embedding"]["post"]
    assert "501" not in paths["/sdapi/v1/create/embedding"]["post"]["responses"]


def test_interrupt_stops_training_and_writes_nothing(served):
    """As A1111's: /sdapi/v1/progress shows the training's steps, /sdapi/v1/interrupt stops it (sdfc then keeps
    the file as it was: the answer says so)."""
    server, s, _, embeddings = served
    url = f"{server.url}/sdapi/v1"
    assert s.post(f"{url}/create/embedding", json={"name": "intemb", "init_text": INIT}).status_code == 200
    before = (embeddings / "intemb.safetensors").read_bytes()
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(r=s.post(
        f"{url}/train/embedding", json=train_body(embedding_name="intemb", steps=20000), timeout=60)))
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = s.get(f"{url}/progress").json()["state"]
        if state["job"] == "train_embedding" and state["sampling_step"] >= 2:
            break
        time.sleep(0.05)
    assert state["job"] == "train_embedding" and state["sampling_steps"] == 20000, state
    assert s.post(f"{url}/interrupt").status_code == 200
    worker.join(60)
    info = answer["r"].json()["info"]
    assert info.startswith("train embedding complete: filename:  error: interrupted at step "), info
    assert (embeddings / "intemb.safetensors").read_bytes() == before
    assert s.get(f"{url}/progress").json()["state"]["job"] == ""


def test_without_torch_create_works_and_train_says_501(tmp_path, served):
    """The serving image: no torch. create needs none; train answers 501 after validating the request."""
    _, _, training, _ = served
    hide = tmp_path / "hide"
    hide.mkdir()
    # find_spec answers None for a name whose sys.modules entry is None, and importing it fails: as if absent
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules.update(torch=None, diffusers=None)\n")
    server = start_server(tmp_path, env={"SDFC_TRAINING_DIR": str(training), "OMP_NUM_THREADS": "1",
                                         "SDFC_EMBEDDINGS_DIR": str(tmp_path / "embeddings"),
                                         "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])})
    try:
        s = requests.Session()
        s.auth = (USER, PASSWORD)
        url = f"{server.url}/sdapi/v1"
        r = s.post(f"{url}/create/embedding", json={"name": NAME, "init_text": INIT})
        assert r.status_code == 200 and (tmp_path / "embeddings" / f"{NAME}.safetensors").is_file(), r.text
        assert s.post(f"{url}/train/embedding", json=train_body(data_root="nothere")).status_code == 404
        r = s.post(f"{url}/train/embedding", json=train_body(steps=1))
        assert r.status_code == 501 and "no torch" in r.json()["detail"], r.text
    finally:
        server.stop()
