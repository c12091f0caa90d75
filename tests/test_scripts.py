"""A1111's built-in scripts (script_name / script_args) through a real `sdfc serve`: image counts, grid sizes
and layout, infotext per image, which prompt and seed each image gets; each image compared with the
engine's own image for the request A1111's script would make; /scripts and /script-info; hostile args."""
from __future__ import annotations

import base64
import io
import json
import math
import re
import time

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image, ImageDraw

from sdfc.engine import Engine, GenerationRequest
from sdfc.engine.upscale import _upscaler_pass
from sdfc.records import open_store
from sdfc.scripts import grids
from sdfc.scripts.xyz_grid import XYZPlot, csv_values, expand, supported_axes

from .conftest import two_model_folder
from .live_server import PASSWORD, USER, start_server

SMALL = dict(width=64, height=64, steps=3, sampler_name="Euler")
AX = XYZPlot().args("txt2img")[0].choices  # A1111's axis labels for txt2img: an axis type is an index here
STEPS, CFG, SEED, PROMPT_SR = AX.index("Steps"), AX.index("CFG Scale"), AX.index("Seed"), AX.index("Prompt S/R")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Two models, for the checkpoint axis."""
    return two_model_folder(tmp_path_factory.mktemp("models"), "c")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("scripts")
    url = f"sqlite:///{tmp / 'records.db'}"
    server = start_server(tmp, env={"SDFC_MODELS_DIR": str(models_dir), "SDFC_DATABASE_URL": url,
                                    "SDFC_DISPATCH": "local", "SDFC_MAX_PIXELS": str(256 * 256)})
    store = open_store(url)
    yield server, store
    server.stop()
    store.close()


@pytest.fixture(scope="module")
def server(deployment):
    return deployment[0]


@pytest.fixture(scope="module")
def local(models_dir):
    return Engine(models_dir)


def post(server, mode: str, body: dict, status: int = 200):
    r = requests.post(f"{server.url}/sdapi/v1/{mode}", json=body, auth=(USER, PASSWORD), timeout=300)
    assert r.status_code == status, r.text[:500]
    if status != 200:
        return r.json()
    data = r.json()
    info = json.loads(data["info"])
    images = [Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB") for i in data["images"]]
    return images, info


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def noise_image(size, seed=3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def engine_image(local, **fields) -> Image.Image:
    return local.generate(GenerationRequest(**{**SMALL, **fields})).images[0]


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


PARAM = re.compile(r'\s*(\w[\w \-/.]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def params_of(infotext: str) -> dict:
    """The parameter line's values as written (quoted ones keep their quotes)."""
    return {m.group(1): m.group(2) for m in PARAM.finditer(infotext.splitlines()[-1])}


def font_pad_top(texts: list, cell_w: int, cell_h: int) -> int:
    """A1111's top pad: the tallest column label (its lines, a line spacing apart) plus twice the line
    spacing. `texts`: a label per column, a string or a list of lines."""
    size = (cell_w + cell_h) // 25
    spacing = size // 2
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def height(text):
        box = draw.multiline_textbbox((0, 0), text, font=grids.font(size))
        return box[3] - box[1]
    heights = [sum(height(t) + spacing for t in ([c] if isinstance(c, str) else c)) - spacing for c in texts]
    return 0 if sum(heights) == 0 else max(heights) + spacing * 2


# ---------------------------------------------------------------------------------------------------
# Pure parts: value syntax, grids, tiles


def test_xyz_value_syntax_as_a1111():
    axes = {a.label: a for a in supported_axes(None).values()}
    steps, cfg = axes["Steps"], axes["CFG Scale"]
    assert expand(steps, csv_values("1-5"), 16, "X") == [1, 2, 3, 4, 5]
    assert expand(steps, csv_values("1-9 (+2)"), 16, "X") == [1, 3, 5, 7, 9]
    assert expand(steps, csv_values("10-1 (-3)"), 16, "X") == [10, 7, 4]  # range(start, end + 1, step)
    assert expand(steps, csv_values("1-10 [5]"), 16, "X") == [1, 3, 5, 7, 10]  # int(linspace)
    assert expand(steps, csv_values("2, 4,8"), 16, "X") == [2, 4, 8]
    assert expand(cfg, csv_values("0.5-1.5 (+0.25)"), 16, "X") == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert expand(cfg, csv_values("1-2 [3]"), 16, "X") == [1.0, 1.5, 2.0]
    assert csv_values('"a, b", c ,"d"') == ["a, b", "c", "d"]
    with pytest.raises(Exception, match="over the limit"):
        expand(steps, csv_values("1-1000000000"), 16, "X")  # refused before the range is made
    with pytest.raises(Exception, match="does not read"):
        expand(steps, csv_values("five"), 16, "X")


def test_image_grid_layout():
    cells = [Image.new("RGB", (64, 48), (i * 20, 0, 0)) for i in range(6)]
    assert grids.image_grid(cells).size == (3 * 64, 2 * 48)           # rows round(sqrt(6)) = 2
    assert grids.image_grid(cells, rows=1).size == (6 * 64, 48)
    assert grids.image_grid(cells[:3], rows=5).size == (64, 3 * 48)  # rows capped at the image count
    grid = grids.image_grid(cells, rows=2)
    assert grid.getpixel((64 * 2 + 5, 48 + 5)) == (100, 0, 0)         # cell 5: row 1, column 2


def test_annotations_size():
    im = Image.new("RGB", (2 * 64, 3 * 64))
    hor = [[grids.Label("left")], [grids.Label("right")]]
    ver = [[grids.Label(f"row {i}")] for i in range(3)]
    out = grids.draw_grid_annotations(im, 64, 64, hor, ver, margin=10)
    assert out.size == (64 * 3 // 4 + 2 * 64 + 10, font_pad_top(["left", "right"], 64, 64) + 3 * 64 + 2 * 10)
    bare = grids.draw_grid_annotations(im, 64, 64, [[grids.Label()]] * 2, [[grids.Label()]] * 3)
    assert bare.size == im.size  # no labels: no pads


def test_tile_layout_matches_a1111_split_grid():
    # cols = ceil((w - overlap) / (tile - overlap)), spread evenly, the last flush with the edge.
    xs, ys = grids.tile_layout(128, 100, 64, 64, 8)
    assert xs == [0, 32, 64] and ys == [0, 36]
    xs, ys = grids.tile_layout(256, 64, 64, 64, 8)
    assert len(xs) == math.ceil((256 - 8) / 56) and xs[0] == 0 and xs[-1] == 192 and ys == [0]
    xs, ys = grids.tile_layout(48, 48, 64, 64, 8)  # smaller than a tile: one tile, hanging over
    assert xs == [-16] and ys == [-16]


def test_combine_grid_puts_tiles_back_and_blends_the_overlap():
    image = noise_image((200, 150))
    grid = grids.split_grid(image, 64, 64, 16)
    assert same(grids.combine_grid(grid), image)  # tiles of one image give that image back
    # Two solid tiles: over the overlap the right tile fades in along A1111's ramp floor(k·255/overlap).
    grid = grids.split_grid(Image.new("RGB", (112, 64)), 64, 64, 16)
    assert [t.x for t in grid.rows[0].tiles] == [0, 48]
    grid.rows[0].tiles[0].image = Image.new("RGB", (64, 64), (0, 0, 0))
    grid.rows[0].tiles[1].image = Image.new("RGB", (64, 64), (255, 255, 255))
    row = np.asarray(grids.combine_grid(grid))[10, :, 0].astype(int)
    ramp = (np.arange(16) * 255 / 16).astype(np.uint8).astype(int)
    assert np.all(row[:48] == 0) and np.all(row[64:] == 255)
    assert np.abs(row[48:64] - ramp).max() <= 1


# ---------------------------------------------------------------------------------------------------
# /scripts and /script-info


def test_scripts_lists_exactly_the_supported_ones(server):
    r = requests.get(f"{server.url}/sdapi/v1/scripts", auth=(USER, PASSWORD))
    assert r.json() == {"txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot"],
                        "img2img": ["loopback", "outpainting mk2", "poor man's outpainting", "prompt matrix",
                                    "prompts from file or textbox", "sd upscale", "x/y/z plot"]}
    info = requests.get(f"{server.url}/sdapi/v1/script-info", auth=(USER, PASSWORD)).json()
    assert [(s["name"], s["is_img2img"]) for s in info] == \
        [(n, False) for n in r.json()["txt2img"]] + [(n, True) for n in r.json()["img2img"]]
    for script in info:
        assert script["is_alwayson"] is False
        for arg in script["args"]:
            assert set(arg) == {"label", "value", "minimum", "maximum", "step", "choices"}
    upscale = next(s for s in info if s["name"] == "sd upscale")
    assert [a["label"] for a in upscale["args"]] == ["", "Tile overlap", "Upscaler", "Scale Factor"]
    assert upscale["args"][2]["choices"] == ["None", "Lanczos", "Nearest"]
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    assert len(xyz["args"]) == 18 and xyz["args"][0]["label"] == "X type" and xyz["args"][0]["value"] == "Seed"
    assert "VAE" not in xyz["args"][0]["choices"] and "Steps" in xyz["args"][0]["choices"]


@pytest.mark.slow
def test_every_listed_axis_runs(server):
    """/script-info lists exactly the axes that work: each runs, as X with one value."""
    info = requests.get(f"{server.url}/sdapi/v1/script-info", auth=(USER, PASSWORD)).json()
    labels = XYZPlot().args("txt2img")[0].choices
    example = {"Nothing": "", "Seed": "3", "Var. seed": "4", "Var. strength": "0.5", "Steps": "2",
               "CFG Scale": "5", "Prompt S/R": "cat", "Prompt order": "cat, dog", "Sampler": ["DDIM"],
               "Checkpoint name": ["tiny-sd-b"], "Schedule type": ["Karras"], "Eta": "0.5", "Clip skip": "1",
               "Denoising": "0.5", "RNG source": ["CPU"], "Size": "48x64"}
    shown = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])["args"][0]["choices"]
    assert sorted(shown) == sorted(example)
    for label in shown:
        value = example[label]
        args = [labels.index(label), value if isinstance(value, str) else "", value if isinstance(value, list) else []]
        images, info_ = post(server, "txt2img", dict(SMALL, prompt="a cat and a dog", seed=1,
                                                     script_name="X/Y/Z plot", script_args=args))
        assert len(images) == 1, label


# ---------------------------------------------------------------------------------------------------
# Prompt matrix


def test_prompt_matrix(server, local):
    images, info = post(server, "txt2img", dict(SMALL, prompt="a house | red | at night", seed=11,
                                                script_name="prompt matrix", script_args=[]))
    prompts = ["a house ", "a house , red", "a house , at night", "a house , red, at night"]
    assert len(images) == 1 + 4 and info["index_of_first_image"] == 1
    # 2 optional parts: 2 rows (1 << 1//2 ... = 2) × 2 columns, labels across and down.
    assert images[0].size == (64 * 3 // 4 + 2 * 64, font_pad_top(["red"], 64, 64) + 2 * 64)
    assert info["all_prompts"] == prompts and info["all_seeds"] == [11] * 4
    assert len(info["infotexts"]) == 5 and info["infotexts"][0] == info["infotexts"][1]
    for i, prompt in enumerate(prompts):
        assert info["infotexts"][i + 1].startswith(prompt + "\nSteps: 3")
        assert params_of(info["infotexts"][i + 1])["Seed"] == "11"
        assert same(images[i + 1], engine_image(local, prompt=prompt, seed=11))
    # The grid holds the images at A1111's places (column = first part, row = second).
    pad_top = images[0].height - 128
    cell = images[0].crop((48 + 64, pad_top, 48 + 128, pad_top + 64))
    assert same(cell, images[2])


def test_prompt_matrix_negative_random_seeds_at_start_with_margins(server):
    images, info = post(server, "txt2img", dict(SMALL, prompt="a boat", negative_prompt="blur|dark|fog|rain",
                                                seed=20, subseed=5, script_name="prompt matrix",
                                                script_args=[True, True, "negative", "space", 6]))
    assert len(images) == 1 + 8
    assert info["all_seeds"] == list(range(20, 28)) and info["all_subseeds"] == list(range(5, 13))
    assert info["all_negative_prompts"][:4] == ["blur", "dark blur", "fog blur", "dark fog blur"]
    assert info["all_prompts"] == ["a boat"] * 8
    # 3 optional parts: 2 across (4 columns), 1 down (2 rows), 6 px margins.
    assert images[0].size == (48 + 4 * 64 + 3 * 6, font_pad_top([["dark", "fog"]], 64, 64) + 2 * 64 + 6)


def test_prompt_matrix_at_the_image_limit(server):
    """SDFC_MAX_IMAGES (16) bounds the images a script makes, as batch_size × n_iter; the grid is extra."""
    images, info = post(server, "txt2img", dict(SMALL, steps=1, prompt="m|a|b|c|d", script_name="prompt matrix"))
    assert len(images) == 1 + 16 and len(set(info["all_prompts"])) == 16
    assert images[0].size[0] == 48 + 4 * 64 and images[0].size[1] > 4 * 64  # 4 × 4 with labels
    detail = post(server, "txt2img", dict(SMALL, prompt="m|a|b|c|d|e", script_name="prompt matrix"), 400)["detail"]
    assert "32 images" in detail and "SDFC_MAX_IMAGES" in detail


# ---------------------------------------------------------------------------------------------------
# Prompts from file or textbox


def test_prompts_from_file(server, local):
    text = "\n".join(["a dog", "", '--prompt "a bird" --steps 2 --seed 9 --n_iter 2 --cfg_scale 4.5',
                      "--negative_prompt 'ugly' --width 48", "--bogus 1"])
    images, info = post(server, "txt2img", dict(SMALL, prompt="photo", seed=30, script_name="prompts from file or textbox",
                                                script_args=[False, False, "end", text]))
    assert len(images) == 1 + 2 + 1 + 1 and info["index_of_first_image"] == 0
    assert info["all_prompts"] == ["photo a dog", "photo a bird", "photo a bird", "photo", "photo --bogus 1"]
    assert info["all_seeds"] == [30, 9, 10, 30, 30]
    assert [im.size for im in images] == [(64, 64)] * 3 + [(48, 64), (64, 64)]
    assert params_of(info["infotexts"][1])["Steps"] == "2" and params_of(info["infotexts"][1])["CFG scale"] == "4.5"
    assert "Negative prompt: ugly" in info["infotexts"][3]  # the request's is empty: the line's stands
    assert same(images[2], local.generate(GenerationRequest(**{**SMALL, "prompt": "photo a bird", "steps": 2,
                                                                "seed": 9, "n_iter": 2, "cfg_scale": 4.5})).images[1])
    # Iterate seed every line: the request's batch_size × n_iter per line.
    images, info = post(server, "txt2img", dict(SMALL, prompt="x", seed=40, batch_size=2,
                                                script_name="prompts from file or textbox",
                                                script_args=[True, False, "start", "a\nb\nc"]))
    assert info["all_seeds"] == [40, 41, 42, 43, 44, 45]
    assert info["all_prompts"] == ["a x", "a x", "b x", "b x", "c x", "c x"]


# ---------------------------------------------------------------------------------------------------
# X/Y/Z plot


def xyz_args(x=(0, "", []), y=(0, "", []), z=(0, "", []), legend=True, lone=False, sub=False, keep=False,
             vary=(False, False, False), margin=0, csv_mode=False):
    return [*x, *y, *z, legend, lone, sub, keep, *vary, margin, csv_mode]


def test_xyz_steps_by_cfg(server, local):
    images, info = post(server, "txt2img", dict(SMALL, prompt="a tree", seed=7, script_name="x/y/z plot",
                                                script_args=xyz_args(x=(STEPS, "2-3", []), y=(CFG, "5, 7.5", []),
                                                                     lone=True)))
    assert len(images) == 1 + 4 and info["index_of_first_image"] == 1
    pad_top = font_pad_top(["Steps: 2", "Steps: 3"], 64, 64)
    assert images[0].size == (48 + 2 * 64, pad_top + 2 * 64)
    cells = [(2, 5.0), (3, 5.0), (2, 7.5), (3, 7.5)]  # x fastest
    for i, (steps, cfg) in enumerate(cells):
        p = params_of(info["infotexts"][i + 1])
        assert (p["Steps"], p["CFG scale"], p["Seed"]) == (str(steps), str(cfg), "7")
        assert "Script" not in p
        assert same(images[i + 1], engine_image(local, prompt="a tree", seed=7, steps=steps, cfg_scale=cfg))
    grid = params_of(info["infotexts"][0])
    assert (grid["Script"], grid["X Type"], grid["X Values"], grid["Y Type"], grid["Y Values"]) == \
        ("X/Y/Z plot", "Steps", "2-3", "CFG Scale", '"5, 7.5"')
    assert grid["Steps"] == "2" and grid["CFG scale"] == "5.0"
    assert same(images[0].crop((48 + 64, pad_top + 64, 48 + 128, pad_top + 128)), images[4])
    # Without sub images (the default) only the grid comes back; info still lists every cell.
    images, info = post(server, "txt2img", dict(SMALL, prompt="a tree", seed=7, script_name="x/y/z plot",
                                                script_args=xyz_args(x=(STEPS, "2-3", []), y=(CFG, "5, 7.5", []))))
    assert len(images) == 1 and len(info["infotexts"]) == 5 and info["all_seeds"] == [7] * 4


def test_xyz_z_axis_seeds_prompt_sr_and_sub_grids(server, local):
    images, info = post(server, "txt2img", dict(SMALL, prompt="a red car", seed=50, script_name="x/y/z plot",
                                                script_args=xyz_args(x=(PROMPT_SR, "red, blue, green", []),
                                                                     z=(SEED, "1-2", []), lone=True, sub=True)))
    # 1 main grid + 2 sub grids (one per Z) + 3 × 1 × 2 cells.
    assert len(images) == 1 + 2 + 6 and info["index_of_first_image"] == 1
    sub_w, sub_h = 3 * 64, 64 + font_pad_top(["red", "blue", "green"], 64, 64)  # no row labels: no left pad
    assert images[1].size == images[2].size == (sub_w, sub_h)
    assert images[0].size == (2 * sub_w, sub_h + font_pad_top(["Seed: 1", "Seed: 2"], sub_w, sub_h))
    main, sub = params_of(info["infotexts"][0]), params_of(info["infotexts"][1])
    assert main["Z Type"] == "Seed" and main["Fixed Z Values"] == '"1, 2"' and "Z Type" not in sub
    prompts = ["a red car", "a blue car", "a green car"]
    for i, (seed, prompt) in enumerate([(s, p) for s in (1, 2) for p in prompts]):
        assert info["infotexts"][3 + i].startswith(prompt + "\n")
        assert params_of(info["infotexts"][3 + i])["Seed"] == str(seed)
        assert same(images[3 + i], engine_image(local, prompt=prompt, seed=seed))


def test_xyz_dropdown_axes_and_checkpoint(server, local):
    labels = AX
    images, info = post(server, "txt2img", dict(SMALL, prompt="a hill", seed=3, script_name="x/y/z plot",
                                                script_args=xyz_args(x=(labels.index("Sampler"), "", ["Euler a", "DDIM"]),
                                                                     y=(labels.index("Checkpoint name"), "",
                                                                        ["tiny-sd", "tiny-sd-b"]), lone=True)))
    assert len(images) == 5
    models = [params_of(t)["Model"] for t in info["infotexts"][1:]]
    samplers = [params_of(t)["Sampler"] for t in info["infotexts"][1:]]
    assert models == ["tiny-sd", "tiny-sd", "tiny-sd-b", "tiny-sd-b"] and samplers == ["Euler a", "DDIM"] * 2
    assert same(images[2], engine_image(local, prompt="a hill", seed=3, sampler_name="DDIM"))
    assert params_of(info["infotexts"][0])["X Values"] == '"Euler a,DDIM"'  # the dropdown as CSV
    # Vary seeds for X; Keep -1 off fixes the seed once for every cell.
    images, info = post(server, "txt2img", dict(SMALL, prompt="a hill", seed=-1, script_name="x/y/z plot",
                                                script_args=xyz_args(x=(STEPS, "2,3,2", []), y=(CFG, "4,5", []),
                                                                     vary=(True, False, False))))
    s = info["all_seeds"][0]
    assert info["all_seeds"] == [s, s + 1, s + 2] * 2


def test_xyz_size_axis(server):
    images, info = post(server, "txt2img", dict(SMALL, prompt="p", seed=1, script_name="x/y/z plot",
                                                script_args=xyz_args(x=(AX.index("Size"), "64x64, 48x32", []), lone=True)))
    assert [im.size for im in images[1:]] == [(64, 64), (48, 32)]
    assert images[0].size[0] == 2 * 64  # cells in 64 × 64 slots


# ---------------------------------------------------------------------------------------------------
# img2img: Loopback and SD upscale


def test_loopback(server, local):
    init = noise_image((64, 64))
    images, info = post(server, "img2img", dict(SMALL, prompt="a lake", seed=60, init_images=[png_b64(init)],
                                                denoising_strength=0.8, script_name="loopback",
                                                script_args=[3, 0.4, "Linear", "None"]))
    assert len(images) == 1 + 3 and images[0].size == (3 * 64, 64) and info["index_of_first_image"] == 1
    assert len(set(info["infotexts"])) == 1  # every image carries the first loop's infotext
    p = params_of(info["infotexts"][0])
    assert (p["Seed"], p["Denoising strength"], p["Final denoising strength"], p["Denoising curve"]) == \
        ("60", "0.8", "0.4", "Linear")
    assert info["all_seeds"] == [60, 61, 62]
    # Each loop is img2img of the previous output, seed + 1, denoising 0.8 → 0.6 → 0.4 (linear).
    previous = init
    for i, strength in enumerate([0.8, 0.8 + (0.4 - 0.8) * 0.5, 0.4]):
        expected = engine_image(local, prompt="a lake", seed=60 + i, init_images=[previous],
                                denoising_strength=strength)
        assert same(images[1 + i], expected), f"loop {i}"
        previous = images[1 + i]
    # n_iter 2: each batch starts again from the init image; each batch's last image is kept.
    images, info = post(server, "img2img", dict(SMALL, prompt="a lake", seed=60, n_iter=2, init_images=[png_b64(init)],
                                                script_name="loopback", script_args=[2, 0.5, "Aggressive", "None"]))
    assert len(images) == 1 + 2 and images[0].size == (128, 64)


@pytest.mark.slow
def test_sd_upscale_a1111_request_through_webuiapi(server, local):
    """A1111's test/test_img2img.py request (script_args ["", 8, "Lanczos", 2.0], steps 3, Euler a, 64×64
    tiles), with a 128×128 init image standing in for its test picture."""
    init = noise_image((128, 128), seed=9)
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username=USER, password=PASSWORD)
    result = api.img2img(images=[init], prompt="example prompt", negative_prompt="",
                         batch_size=1, cfg_scale=7,
                         denoising_strength=0.75, eta=0, width=64, height=64, steps=3, sampler_name="Euler a",
                         seed=70, script_name="sd upscale", script_args=["", 8, "Lanczos", 2.0])
    assert len(result.images) == 1 and result.image.size == (256, 256)
    p = params_of(result.info["infotexts"][0])
    assert (p["Size"], p["Seed"], p["SD upscale overlap"], p["SD upscale upscaler"]) == ("64x64", "70", "8", "Lanczos")
    # The same by hand: Lanczos ×2, 5 × 5 tiles of 64 with 8 px overlap, tile i at seed 70 + i, blended back.
    big = _upscaler_pass(init, 2.0, Image.LANCZOS)
    grid = grids.split_grid(big, 64, 64, 8)
    tiles = [t for row in grid.rows for t in row.tiles]
    assert len(tiles) == 25
    for i, tile in enumerate(tiles):
        tile.image = engine_image(local, prompt="example prompt", seed=70 + i, init_images=[tile.image],
                                  sampler_name="Euler a", eta=0)
    assert same(result.image, grids.combine_grid(grid))


def test_sd_upscale_batches_and_n_iter(server):
    init = noise_image((64, 64))
    images, info = post(server, "img2img", dict(SMALL, prompt="q", seed=80, batch_size=2, n_iter=2,
                                                init_images=[png_b64(init)], script_name="SD upscale",
                                                script_args=["", 16, 2, 1.5]))  # Nearest by index
    # 64 × 1.5 = 96: 2 × 2 tiles of 64, batches of 2; one image per n_iter, seeds 80 and 81.
    assert [im.size for im in images] == [(96, 96), (96, 96)]
    assert info["all_seeds"] == [80, 81] and params_of(info["infotexts"][1])["Seed"] == "80"
    images, _ = post(server, "img2img", dict(SMALL, prompt="q", init_images=[png_b64(init)],
                                             script_name="sd upscale", script_args=["", 8, "None", 2.0]))
    assert images[0].size == (64, 64)  # no upscaler: the tiles cover the image as it is


# ---------------------------------------------------------------------------------------------------
# Records and refusals


def test_every_returned_image_is_recorded(deployment):
    server, store = deployment
    images, info = post(server, "txt2img", dict(SMALL, prompt="zebracorn | a | b", seed=5,
                                                script_name="prompt matrix", script_args=[]))
    p = store.placeholder
    deadline = time.monotonic() + 20
    rows = []
    while time.monotonic() < deadline and len(rows) < 5:
        rows = store._fetch(f"SELECT `image_index`, `infotext`, `seed` FROM `generated_images` "
                            f"WHERE `prompt` LIKE {p}", ("zebracorn%",))
        time.sleep(0.05)
    assert sorted(r["image_index"] for r in rows) == [0, 1, 2, 3, 4]
    assert {r["infotext"] for r in rows} == set(info["infotexts"])


HOSTILE = [
    ("txt2img", "prompt matrix", {"script_args": [1, 2, 3]}),
    ("txt2img", "prompt matrix", {"script_args": [False, False, "sideways"]}),
    ("txt2img", "prompt matrix", {"script_args": [False] * 6}),
    ("txt2img", "prompt matrix", {"prompt": "|".join("abcdefghijkl")}),          # 2^11 images
    ("txt2img", "prompt matrix", {"prompt": "|" * 5000}),
    ("txt2img", "prompt matrix", {"script_args": [False, False, "positive", "comma", 10 ** 9]}),
    ("txt2img", "prompts from file or textbox", {"script_args": [False, False, "start", "a\n" * 40]}),
    ("txt2img", "prompts from file or textbox", {"script_args": [False, False, "start", "--steps 100000"]}),
    ("txt2img", "prompts from file or textbox", {"script_args": [False, False, "start", "--n_iter 99"]}),
    ("txt2img", "prompts from file or textbox", {"script_args": [False, False, "start", "--width 99999"]}),
    ("txt2img", "prompts from file or textbox", {"script_args": [False, False, "start", "--cfg_scale nan"]}),
    ("txt2img", "prompts from file or textbox", {"script_args": [False, False, "start", {"a": 1}]}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(STEPS, "1-1000000000000", []))}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(STEPS, "1-5", []), y=(CFG, "1-5", []))}),    # 25 cells
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(AX.index("Prompt order"), "a,b,c,d,e,f,g", []))}),             # 7! orders
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(AX.index("VAE"), "x", []))}),                        # VAE
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(999, "x", []))}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=("Steps", "abc", []))}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(STEPS, "", []))}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(PROMPT_SR, "absent", []))}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(AX.index("Sampler"), "", ["Nope"]))}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(STEPS, "1-3 (+0)", []))}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(CFG, "1e309", []))}),
    ("txt2img", "x/y/z plot", {"script_args": xyz_args(x=(STEPS, "1000", []))}),
    ("img2img", "loopback", {"script_args": [1000, 0.5, "Linear", "None"]}),
    ("img2img", "loopback", {"script_args": [4, 0.5, "Linear", "CLIP"]}),
    ("img2img", "loopback", {"script_args": [4, 2.0, "Linear", "None"]}),
    ("img2img", "sd upscale", {"script_args": ["", 64, "Lanczos", 2.0]}),                        # overlap = tile
    ("img2img", "sd upscale", {"script_args": ["", 8, "ESRGAN_4x", 2.0]}),
    ("img2img", "sd upscale", {"script_args": ["", 8, 7, 2.0]}),
    ("img2img", "sd upscale", {"script_args": ["", 8, "Lanczos", 40.0]}),
    ("img2img", "sd upscale", {"script_args": ["", 32, "Lanczos", 4.0], "steps": 150}),            # work bound
    ("txt2img", "loopback", {}),                                                                 # img2img only
    ("txt2img", "no such script", {}),
]


@pytest.mark.parametrize("mode,name,changes", HOSTILE, ids=[f"{i}-{h[1]}" for i, h in enumerate(HOSTILE)])
def test_hostile_script_args_are_refused(server, mode, name, changes):
    body = {**SMALL, "prompt": "a cat", "script_name": name, **changes}
    if mode == "img2img":
        body["init_images"] = [png_b64(noise_image((64, 64)))]
    r = requests.post(f"{server.url}/sdapi/v1/{mode}", json=body, auth=(USER, PASSWORD), timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if name in ("no such script", "loopback") and mode == "txt2img":
        assert r.status_code == 422 and r.json()["detail"] == f"Script '{name}' not found"


def test_script_name_is_case_insensitive_and_null_means_none(server):
    images, _ = post(server, "txt2img", dict(SMALL, prompt="a | b", script_name="PROMPT MATRIX"))
    assert len(images) == 3
    images, _ = post(server, "txt2img", dict(SMALL, prompt="a | b", script_name=None, script_args=[1, 2]))
    assert len(images) == 1


def test_progress_counts_every_engine_job_of_a_script(server):
    """/progress during an X/Y/Z plot: job_count is the cells, job_no counts them up."""
    import threading
    body = dict(SMALL, steps=100, prompt="a slow one", seed=2, script_name="x/y/z plot",
                script_args=xyz_args(x=(CFG, "3, 4, 5, 6", [])))
    done = threading.Event()
    thread = threading.Thread(target=lambda: (post(server, "txt2img", body), done.set()))
    thread.start()
    seen = []
    while not done.is_set():
        state = requests.get(f"{server.url}/sdapi/v1/progress?skip_current_image=true", auth=(USER, PASSWORD),
                             timeout=10).json()["state"]
        if state["job_count"]:
            seen.append((state["job_count"], state["job_no"]))
        time.sleep(0.02)
    thread.join()
    assert seen and {count for count, _ in seen} == {4}
    job_nos = [no for _, no in seen]
    assert job_nos == sorted(job_nos) and {1, 2, 3} <= set(job_nos) and max(job_nos) <= 4
