"""LoRA training (sdfc/training): on the tiny model and four small images of three aspect ratios, a few dozen
steps lower the loss; the kohya-style file it writes loads in the engine (`<lora:zkz:1>` changes the trigger
prompt's image, `<lora:zkz:0>` leaves it bit-identical) and in diffusers (whose fused LoRA gives the engine's
image, and a lower loss on fixed noise than the base model); the same through `sdfc train lora` and through the
task route, with progress (step, loss) and a cancel; hostile requests are refused before anything is queued."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from sdfc.api.errors import ApiError, ValidationFailed
from sdfc.engine import Engine, GenerationRequest

from .conftest import TINY_MODEL
from .live_server import PASSWORD, USER, start_server
from .reference import ReferencePipeline

torch = pytest.importorskip("torch")

TRIGGER = "zkz"
STEPS, LR, RANK, SEED = 40, 1e-2, 4, 1
EMB_LR = 5e-2
SIZES = [(64, 64), (96, 64), (64, 96), (80, 80)]  # three buckets at resolution 64: 64x64, 80x48, 48x80
GEN_STEPS, CFG, GEN_SEED = 8, 7.0, 77


def make_images(folder: Path) -> Path:
    """Four patterned images, each with its caption beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(SIZES):
        y, x = np.mgrid[0:h, 0:w]
        a = np.zeros((h, w, 3), np.uint8)
        a[..., i % 3] = 220
        a[((x // 8 + y // 8) % 2) == 0] = (20, 200, 40)
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{TRIGGER}, checkered pattern")
    return folder


@pytest.fixture(scope="module")
def training_dir(tmp_path_factory, tiny_diffusers) -> Path:
    root = tmp_path_factory.mktemp("training")
    shutil.copytree(tiny_diffusers, root / "models" / "tiny")
    make_images(root / "images" / "checkers")
    return root


def config(training_dir: Path, out: Path, **overrides):
    from sdfc.training.lora_trainer import LoraTrainingConfig

    values = dict(base=training_dir / "models" / "tiny", images=training_dir / "images" / "checkers", output=out,
                  rank=RANK, learning_rate=LR, steps=STEPS, resolution=64, seed=SEED)
    values.update(overrides)
    return LoraTrainingConfig(**values)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def trained(training_dir, lora_dir):
    from sdfc.training.lora_trainer import train_lora

    seen = []
    result = train_lora(config(training_dir, lora_dir / f"{TRIGGER}.safetensors"),
                        progress=lambda step, loss: seen.append((step, loss)))
    return result, seen


def read(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_the_loss_falls_and_the_file_is_kohya_lora(trained):
    result, seen = trained
    assert [s for s, _ in seen] == list(range(1, STEPS + 1)) and [l for _, l in seen] == result.losses
    assert np.mean(result.losses[-10:]) < 0.85 * np.mean(result.losses[:10])
    tensors, metadata = read(result.path)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert all(m.startswith("lora_unet_") and m.rsplit("_", 2)[-2:] in (["to", "q"], ["to", "k"], ["to", "v"],
                                                                        ["out", "0"]) for m in modules)
    assert len(modules) == 4 * 8  # q/k/v/out of 8 attention layers: attn1/attn2 of 4 blocks (down, mid, 2 up)
    for m in modules:
        assert tensors[f"{m}.lora_down.weight"].shape[0] == RANK and tensors[f"{m}.lora_up.weight"].shape[1] == RANK
        assert float(tensors[f"{m}.alpha"]) == RANK
        assert np.abs(tensors[f"{m}.lora_up.weight"]).max() > 0  # trained from zero
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    assert (metadata["ss_max_train_steps"], metadata["ss_num_train_images"]) == (str(STEPS), "4")
    assert metadata["ss_resolution"] == "(64, 64)" and metadata["ss_output_name"] == TRIGGER
    assert float(metadata["ss_learning_rate"]) == LR and float(metadata["ss_training_started_at"]) > 1e9
    buckets = json.loads(metadata["ss_bucket_info"])["buckets"].values()
    assert sorted((tuple(b["resolution"]), b["count"]) for b in buckets) == [((48, 80), 1), ((64, 64), 2),
                                                                             ((80, 48), 1)]
    assert json.loads(metadata["ss_tag_frequency"]) == {"checkers": {TRIGGER: 4, "checkered pattern": 4}}


def test_symlinks_in_the_image_folder_are_not_read(tmp_path):
    from sdfc.training.dataset import caption_of, image_paths

    secret = tmp_path / "secret.txt"
    secret.write_text("password123")
    folder = make_images(tmp_path / "images")
    (folder / "img0.txt").unlink()
    (folder / "img0.txt").symlink_to(secret)
    (folder / "linked.png").symlink_to(folder / "img1.png")
    assert [p.name for p in image_paths(folder)] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert caption_of(folder / "img0.png", "shared prompt") == "shared prompt"


def test_buckets_keep_the_aspect_ratio():
    from sdfc.training.dataset import buckets, nearest_bucket

    sd = buckets(512, 64)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sd)
    assert {(512, 512), (768, 320), (320, 768)} <= set(sd)
    assert nearest_bucket((1920, 1080), sd) == (640, 384) and nearest_bucket((1000, 1000), sd) == (512, 512)


def test_the_same_seed_trains_the_same_lora(training_dir, tmp_path):
    from sdfc.training.lora_trainer import train_lora

    files = [train_lora(config(training_dir, tmp_path / f"{name}.safetensors", steps=4, seed=seed)).path
             for name, seed in (("a", 5), ("b", 5), ("c", 6))]
    a, b, c = (read(f)[0] for f in files)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith("lora_down.weight"))


def generate(engine, prompt: str):
    return engine.generate(GenerationRequest(prompt=prompt, negative_prompt="", width=64, height=64,
                                             steps=GEN_STEPS, cfg_scale=CFG, sampler_name="Euler", seed=GEN_SEED))


@pytest.fixture(scope="module")
def engine(trained, lora_dir):
    return Engine(TINY_MODEL.parent, lora_dir=lora_dir)


def test_the_engine_applies_it_and_weight_zero_is_the_base_model(engine):
    plain = generate(engine, TRIGGER).float_images[0]
    with_lora = generate(engine, f"{TRIGGER} <lora:{TRIGGER}:1>").float_images[0]
    zero = generate(engine, f"{TRIGGER} <lora:{TRIGGER}:0>").float_images[0]
    assert np.abs(with_lora - plain).max() > 1e-2
    assert np.array_equal(zero, plain)


def test_diffusers_loads_it_with_the_engines_image_and_a_lower_loss(trained, engine, lora_dir, tiny_diffusers,
                                                                    training_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdfc.engine.rng import ImageRNG
    from sdfc.training import dataset

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_diffusers), safety_checker=None,
                                                   requires_safety_checker=False)
    images = dataset.load_dataset(training_dir / "images" / "checkers", None, 64, 16)
    before = fixed_noise_loss(pipe, images, images[0].caption)
    pipe.load_lora_weights(str(lora_dir), weight_name=f"{TRIGGER}.safetensors", adapter_name=TRIGGER)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    after = fixed_noise_loss(pipe, images, images[0].caption)
    assert after < 0.9 * before
    out = tmp_path / "fused"
    shutil.copytree(tiny_diffusers, out)
    pipe.unet.save_pretrained(str(out / "unet"))
    rng = ImageRNG((4, 8, 8), [GEN_SEED], source="GPU")
    expected = ReferencePipeline(out).k_sample("euler", TRIGGER, "", rng.first(), rng.next, GEN_STEPS, CFG,
                                               "uniform")[0]
    assert np.abs(generate(engine, f"{TRIGGER} <lora:{TRIGGER}:1>").float_images[0] - expected).max() <= 1e-4


def fixed_noise_loss(pipe, images, prompt: str) -> float:
    """The noise-prediction loss over the training images on fixed noise at fixed timesteps (the training
    loss itself draws them at random): a measure that only the weights move."""
    from sdfc.training import dataset

    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    total, count = 0.0, 0
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        for image in images:
            x0 = pipe.vae.encode(torch.from_numpy(dataset.pixels(image))[None]).latent_dist.mean * 0.18215
            for t in (100, 300, 500, 700, 900):
                noise, t = torch.randn(x0.shape, generator=g), torch.tensor([t])
                predicted = pipe.unet(pipe.scheduler.add_noise(x0, noise, t), t, cond).sample
                total, count = total + float(torch.nn.functional.mse_loss(predicted, noise)), count + 1
    return total / count


def test_a_text_encoder_lora_changes_the_conditioning(training_dir, tmp_path):
    from sdfc.training.lora_trainer import train_lora

    result = train_lora(config(training_dir, tmp_path / "te.safetensors", steps=6, text_encoder_lr=1e-2))
    tensors, metadata = read(result.path)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert metadata["ss_network_train_unet_only"] == "False"
    engine = Engine(TINY_MODEL.parent, lora_dir=tmp_path)
    plain = generate(engine, TRIGGER).float_images[0]
    te_only = generate(engine, f"{TRIGGER} <lora:te:1:0>").float_images[0]  # text encoder 1, UNet 0
    assert np.abs(te_only - plain).max() > 1e-3


def test_the_command_line(training_dir, tmp_path, capsys):
    from sdfc.cli import main

    out = tmp_path / "cli.safetensors"
    args = ["train", "lora", "--base", str(training_dir / "models" / "tiny"), "--images",
            str(training_dir / "images" / "checkers"), "--out", str(out), "--steps", "3", "--resolution", "64",
            "--rank", "2", "--lr", "1e-3", "--prompt", "unused"]
    assert main(args) == 0
    assert read(out)[1]["ss_network_dim"] == "2" and "step 3/3 loss" in capsys.readouterr().out
    embedding = ["train", "embedding", "--base", str(training_dir / "models" / "tiny"), "--images",
                 str(training_dir / "images" / "checkers"), "--out", str(tmp_path / "cliemb"), "--steps", "2",
                 "--resolution", "64", "--init-text", "pattern", "--vectors", "3"]
    assert main(embedding) == 0 and "use it in a prompt as cliemb" in capsys.readouterr().out
    assert read(tmp_path / "cliemb.safetensors")[0]["emb_params"].shape == (3, 32)
    args[args.index("--base") + 1] = str(TINY_MODEL)  # the ONNX export cannot be trained
    assert main(args) == 2 and "not a diffusers Stable Diffusion folder" in capsys.readouterr().err


def test_hostile_requests_are_refused(training_dir, lora_dir, trained, tmp_path):
    from sdfc.jobs.training_requests import validate

    good = {"base": "models/tiny", "images": "images/checkers", "output_name": "fresh", "steps": 10}
    values = validate(good, training_dir, lora_dir)
    assert values["rank"] == 8 and 0 <= values["seed"] < 2**32 and values["resolution"] == 512
    (tmp_path / "outside").mkdir()
    (training_dir / "link").symlink_to(tmp_path / "outside")
    malformed = [{"images": "../images/checkers"}, {"images": str(training_dir / "images" / "checkers")},
                 {"images": ".hidden"}, {"base": "images/../../x"}, {"base": "a\\b"}, {"base": "x\x00"},
                 {"output_name": "../evil"}, {"output_name": "a/b"}, {"output_name": ""}, {"steps": 0},
                 {"steps": 10**6}, {"steps": True}, {"steps": "10"}, {"rank": 1000}, {"learning_rate": 0},
                 {"learning_rate": 5}, {"resolution": 4096}, {"batch_size": 100}, {"seed": -2},
                 {"buckets": "maybe"}, {"prompt": "x" * 5000}, {"base": None}, {"alpha": float("inf")}]
    for change in malformed:
        with pytest.raises(ValidationFailed):
            validate({**good, **change}, training_dir, lora_dir)
    # well-formed, but no such folder inside the training-data folder (a symlink out of it is none either)
    for change, status in (({"images": "link"}, 404), ({"base": "link/x"}, 404), ({"images": "nothere"}, 404),
                           ({"images": "models/tiny"}, 400),  # a folder without images
                           ({"base": "images/checkers"}, 400)):  # a folder that is no diffusers model
        with pytest.raises(ApiError) as exc:
            validate({**good, **change}, training_dir, lora_dir)
        assert exc.value.status == status, change
    with pytest.raises(ApiError) as exc:  # an existing LoRA is not overwritten unless asked
        validate({**good, "output_name": TRIGGER}, training_dir, lora_dir)
    assert exc.value.status == 409
    assert validate({**good, "output_name": TRIGGER, "overwrite": True}, training_dir, lora_dir)
    with pytest.raises(ApiError) as exc:
        validate(good, None, lora_dir)
    assert exc.value.status == 503


def _wait(session, url, task_id, until, timeout=120.0):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = session.get(f"{url}/sdapi/v2/tasks/{task_id}", timeout=10).json()
        seen.append(task)
        if until(task):
            return task, seen
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never got there: {seen[-1]}")


def training_children(pid: int) -> list:
    """The server's training child processes (`python -m sdfc.training run ...`) still alive."""
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if "sdfc.training" in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_training_as_a_task_with_progress_and_cancel(tmp_path, training_dir):
    loras = tmp_path / "loras"
    loras.mkdir()
    env = {"SDFC_TRAINING_DIR": str(training_dir), "SDFC_LORA_DIR": str(loras), "SDFC_TASK_HEARTBEAT_S": "0.05",
           "SDFC_EMBEDDINGS_DIR": str(tmp_path / "embeddings"),  # made by the training task
           "OMP_NUM_THREADS": "1"}
    server = start_server(tmp_path, env=env)
    try:
        s = requests.Session()
        s.auth = (USER, PASSWORD)
        url = server.url
        body = {"base": "models/tiny", "images": "images/checkers", "output_name": "served", "steps": STEPS,
                "rank": RANK, "learning_rate": LR, "resolution": 64, "seed": SEED}
        bad = s.post(f"{url}/sdapi/v2/tasks/train-lora", json={**body, "images": "../../etc"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "images"]
        assert s.post(f"{url}/sdapi/v2/tasks/train-lora", json={**body, "base": "nothere"}).status_code == 404
        submitted = s.post(f"{url}/sdapi/v2/tasks/train-lora", json=body)
        assert submitted.status_code == 202, submitted.text
        task, seen = _wait(s, url, submitted.json()["task_id"], lambda t: t["status"] in ("succeeded", "failed"))
        assert task["status"] == "succeeded" and task["type"] == "train-lora", json.dumps(task)
        assert task["step"] == STEPS and task["steps"] == STEPS and task["progress"] == 1
        running = [t for t in seen if t["status"] == "running" and t["loss"] is not None]
        assert running and all(0 < t["step"] <= STEPS and t["loss"] > 0 for t in running)
        result = s.get(f"{url}/sdapi/v2/tasks/{task['task_id']}/result").json()
        assert result["file"] == "served.safetensors" and result["steps_done"] == STEPS
        assert result["final_loss"] == task["loss"] and not result["cancelled"]
        # the same request trains the same LoRA as the library does
        from sdfc.training.lora_trainer import train_lora
        served = read(loras / "served.safetensors")[0]
        here = read(train_lora(config(training_dir, tmp_path / "here.safetensors")).path)[0]
        assert served.keys() == here.keys() and all(np.array_equal(served[k], here[k]) for k in here)
        assert "served" in [l["name"] for l in s.get(f"{url}/sdapi/v1/loras").json()]  # listed at once
        images = [s.post(f"{url}/sdapi/v1/txt2img", json={"prompt": p, "steps": 4, "width": 64, "height": 64,
                                                          "seed": 3}).json()["images"][0]
                  for p in (TRIGGER, f"{TRIGGER} <lora:served:1>")]
        assert images[0] != images[1]
        # a long one, cancelled once it has reported progress: nothing is written
        long = s.post(f"{url}/sdapi/v2/tasks/train-lora", json={**body, "output_name": "cancelled", "steps": 20000})
        task_id = long.json()["task_id"]
        _wait(s, url, task_id, lambda t: t["status"] == "running" and t["step"] >= 2 and t["loss"] is not None)
        (child,) = training_children(server.process.pid)  # training runs in a child process, not the server
        assert s.delete(f"{url}/sdapi/v2/tasks/{task_id}").status_code == 200
        task, _ = _wait(s, url, task_id, lambda t: t["status"] not in ("queued", "running"), timeout=30)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE  # the cancel ended it
        assert training_children(server.process.pid) == []
        assert task["status"] == "cancelled" and task["step"] < 20000
        result = s.get(f"{url}/sdapi/v2/tasks/{task_id}/result").json()
        assert result["cancelled"] and result["file"] is None and 2 <= result["steps_done"] < 20000
        assert not (loras / "cancelled.safetensors").exists()
        # an embedding, trained the same way into the embeddings folder, which the engine then lists
        submitted = s.post(f"{url}/sdapi/v2/tasks/train-embedding", json={
            "base": "models/tiny", "images": "images/checkers", "embedding_name": "servedemb", "steps": 5,
            "resolution": 64, "init_text": "pattern", "num_vectors_per_token": 2, "learn_rate": 0.05})
        assert submitted.status_code == 202, submitted.text
        task, _ = _wait(s, url, submitted.json()["task_id"], lambda t: t["status"] in ("succeeded", "failed"))
        assert task["status"] == "succeeded" and task["type"] == "train-embedding" and task["loss"] > 0, task
        result = s.get(f"{url}/sdapi/v2/tasks/{task['task_id']}/result").json()
        assert (result["embedding"], result["lora"], result["file"]) == ("servedemb", None, "servedemb.safetensors")
        listed = s.get(f"{url}/sdapi/v1/embeddings").json()["loaded"]
        assert listed["servedemb"]["vectors"] == 2 and listed["servedemb"]["step"] == 5
    finally:
        server.stop()


def test_a_textual_inversion_embedding_trains_and_loads(training_dir, tiny_diffusers, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file, save_file

    from sdfc.training import dataset
    from sdfc.training.embedding_trainer import EmbeddingTrainingConfig, train_embedding

    name, init = "zkzemb", "pattern"
    folder = tmp_path / "embeddings"
    seen = []
    result = train_embedding(EmbeddingTrainingConfig(
        base=training_dir / "models" / "tiny", images=training_dir / "images" / "checkers",
        output=folder / f"{name}.safetensors", init_text=init, num_vectors=2, learning_rate=EMB_LR, steps=STEPS,
        resolution=64, seed=SEED), progress=lambda step, loss: seen.append(step))
    assert seen == list(range(1, STEPS + 1))
    vectors = load_file(str(result.path))["emb_params"]
    assert vectors.shape == (2, 32)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_diffusers), safety_checker=None,
                                                   requires_safety_checker=False)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    start = table[pipe.tokenizer(init, add_special_tokens=False).input_ids * 2]
    assert np.abs(vectors - start).max() > 1e-3  # it moved from its init text
    save_file({"emb_params": start}, str(tmp_path / "untrained.safetensors"))
    # diffusers reads it (as A1111 would), and on fixed noise it beats its own starting point (by little: the
    # tiny random UNet's output hardly depends on its conditioning, 1.1252 → 1.1219 here)
    pipe.load_textual_inversion(str(result.path), token=name)
    pipe.load_textual_inversion(str(tmp_path / "untrained.safetensors"), token="untrained")
    images = dataset.load_dataset(training_dir / "images" / "checkers", None, 64, 16)
    caption = images[0].caption
    assert fixed_noise_loss(pipe, images, f"{name}, {caption}") < \
        fixed_noise_loss(pipe, images, f"untrained, {caption}") - 1e-3
    # the engine uses it by its file name, as a word of the prompt
    with_it = Engine(TINY_MODEL.parent, embeddings_dir=folder)
    without = Engine(TINY_MODEL.parent, embeddings_dir=tmp_path / "none")
    prompt = f"{name}, {caption}"
    assert np.abs(generate(with_it, prompt).float_images[0] - generate(without, prompt).float_images[0]).max() > 1e-3
