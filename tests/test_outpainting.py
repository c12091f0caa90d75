"""A1111's outpainting scripts (Outpainting mk2, Poor man's outpainting) and the `latent_mask` they rely on.

`latent_mask` against tests/inpaint_reference.py (A1111's processing written from its source); the numpy
`match_histograms` against scikit-image's; each script through a real `sdfc serve`: image counts and sizes
as A1111's, every image rebuilt by hand from the engine jobs A1111's script would run (its masks drawn here
from A1111's rectangle arithmetic), the original kept where A1111 keeps it, the infotext, hostile args.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from sdfc.engine import Engine, GenerationRequest, inpaint
from sdfc.scripts import grids
from sdfc.scripts.outpainting_mk2 import match_histograms, matched_noise

from .conftest import TINY_MODEL
from .live_server import PASSWORD, USER, start_server
from .test_inpaint import _check, _request

SMALL = dict(prompt="a lighthouse", negative_prompt="", width=64, height=64, steps=3, cfg_scale=7.0,
             sampler_name="Euler", denoising_strength=0.8)


def _init(size=(64, 64), seed=5) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _rect(size, box, mode="RGB") -> Image.Image:
    image = Image.new(mode, size, "white")
    ImageDraw.Draw(image).rectangle(box, fill="black")
    return image


# ---- latent_mask: A1111's processing ------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny_diffusers):
    from .inpaint_reference import InpaintReference
    return InpaintReference(tiny_diffusers)


def test_latent_mask_matches_a1111(engine, reference):
    """The latent mask (another box than the mask) drives the fill and the latent blend; the blurred mask
    still drives the overlay. Decoded images ≤ 1e-4 from the torch reference, final images byte-identical."""
    from .inpaint_reference import img2img_init, processing
    from sdfc.engine.rng import ImageRNG
    from sdfc.engine.samplers import img2img_steps

    latent_mask = _rect((64, 64), (8, 8, 40, 48), "L")  # black box: kept in the latent blend
    options = inpaint.InpaintOptions(inpainting_fill=0, inpaint_full_res=False)
    req = _request("Euler", options, latent_mask=latent_mask)
    result = engine.generate(req)
    o = req.inpaint
    p = processing(init_images=req.init_images, width=64, height=64, batch_size=1, mask=req.mask,
                   mask_blur_x=o.mask_blur_x, mask_blur_y=o.mask_blur_y, mask_round=o.mask_round,
                   inpainting_fill=o.inpainting_fill, inpaint_full_res=False, latent_mask=latent_mask)
    p = img2img_init(p, reference, [req.seed], False)
    rng = ImageRNG((4, 8, 8), [req.seed], source="GPU")
    latents = reference.k_inpaint(p, "euler", req.prompt, req.negative_prompt, rng.first(), rng.next, req.steps,
                                  req.cfg_scale, "uniform", img2img_steps(req.steps, req.denoising_strength))
    _check(result, reference.decode(latents), p)
    # The latent mask mattered: without it the same request differs.
    plain = engine.generate(_request("Euler", options))
    assert float(np.abs(plain.float_images[0] - result.float_images[0]).max()) > 1e-2


def test_latent_mask_of_another_size_is_refused_where_a1111_fails(engine):
    from sdfc.engine import InvalidRequestError
    small = Image.new("L", (32, 32), 255)
    with pytest.raises(InvalidRequestError, match="latent_mask is 32x32"):
        engine.generate(_request("Euler", inpaint.InpaintOptions(inpainting_fill=0, inpaint_full_res=False),
                                 latent_mask=small))
    # "original" masked content only resizes it to the latent size (A1111 runs too).
    engine.generate(_request("Euler", inpaint.InpaintOptions(inpainting_fill=1, inpaint_full_res=False),
                             latent_mask=small, steps=2))


# ---- match_histograms and the matched noise -----------------------------------------------------------

def test_match_histograms_equals_scikit_image():
    exposure = pytest.importorskip("skimage.exposure")
    rng = np.random.default_rng(0)
    for image, ref, axis in [(rng.random((700, 3)), rng.random((300, 3)) ** 3, 1),  # as Outpainting mk2 calls it
                             (rng.random((20, 30, 3)), rng.normal(size=(9, 11, 3)), -1),
                             (np.round(rng.random((40, 50)) * 8) / 8, rng.random((10, 20)), None),  # repeated values
                             (rng.random((16, 16, 3)).astype(np.float32), rng.random((8, 8, 3)), 2)]:
        ours, theirs = match_histograms(image, ref, channel_axis=axis), \
            exposure.match_histograms(image, ref, channel_axis=axis)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert np.array_equal(ours, theirs)
    with pytest.raises(ValueError):
        match_histograms(rng.random((4, 3)), rng.random((4, 2)), channel_axis=1)


def test_matched_noise_keeps_the_known_area_and_takes_its_colours():
    image = np.asarray(_init((64, 48)), dtype=np.float64) / 255.0
    mask = np.zeros_like(image)
    mask[:, 40:] = 1.0
    noised = matched_noise(image.copy(), mask, 1.0, 0.05)
    assert np.array_equal(noised[:, :40], image[:, :40])
    assert np.array_equal(noised, matched_noise(image.copy(), mask, 1.0, 0.05))  # deterministic (seed 0)
    new = noised[:, 40:].reshape(-1, 3)
    known = image[:, :40].reshape(-1, 3)
    # Histogram-matched per channel: the new area's quantiles are the known area's.
    for c in range(3):
        q = np.linspace(0.05, 0.95, 7)
        assert np.allclose(np.quantile(new[:, c], q), np.quantile(known[:, c], q), atol=0.03)
    assert not np.array_equal(matched_noise(image.copy(), mask, 2.0, 0.5), noised)


# ---- over HTTP ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = start_server(tmp_path_factory.mktemp("outpainting"), env={"SDFC_MODELS_DIR": str(TINY_MODEL.parent)})
    yield live
    live.stop()


@pytest.fixture(scope="module")
def local():
    return Engine(TINY_MODEL.parent)


def _post(server, body: dict, status: int = 200):
    r = requests.post(f"{server.url}/sdapi/v1/img2img", json=body, auth=(USER, PASSWORD), timeout=300)
    assert r.status_code == status, r.text[:500]
    if status != 200:
        return r.json()
    images = [Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB") for i in r.json()["images"]]
    return images, json.loads(r.json()["info"])


def _job(local, init, mask, latent_mask, seed, options, batch_size=1):
    req = GenerationRequest(**SMALL, seed=seed, init_images=init, mask=mask, latent_mask=latent_mask,
                            inpaint=options, batch_size=batch_size)
    return local.generate(req).images


def _noise_canvas(image: Image.Image, canvas_size, at, mask: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", canvas_size)
    canvas.paste(image, at)
    noised = matched_noise(np.asarray(canvas) / 255.0, np.asarray(mask) / 255.0, 1.0, 0.05)
    return Image.fromarray(np.clip(noised * 255.0, 0, 255).astype(np.uint8))


def test_outpainting_mk2_left_and_right_as_a1111(server, local):
    """64x64 grown by 32 left and right (128 wide: a multiple of 64, no rounding), mask blur 2, batch of 2:
    a grid and 2 images, each rebuilt from the two passes A1111 runs (same seed for both)."""
    init = _init()
    images, info = _post(server, dict(SMALL, init_images=[_b64(init)], seed=11, batch_size=2,
                                      script_name="Outpainting mk2", script_args=["", 32, 2, ["left", "right"], 1.0, 0.05]))
    assert [im.size for im in images] == [(256, 64), (128, 64), (128, 64)]  # grid (2 columns), then the images
    options = inpaint.InpaintOptions(mask_blur_x=8, mask_blur_y=0, inpainting_fill=1, inpaint_full_res=False)
    # Left pass: canvas 128x64 (96 rounded up), the image at x 32, mask black from x 34 (32 + blur), the job
    # the leftmost 64 columns, its latent mask black from x 36 (32 + 2 × blur).
    mask = _rect((128, 64), (34, 0, 96, 64))
    canvas = _noise_canvas(init, (128, 64), (32, 0), mask)
    made = _job(local, [canvas.crop((0, 0, 64, 64))] * 2, mask.crop((0, 0, 64, 64)),
                _rect((64, 64), (36, 0, 96, 64)), 11, options, batch_size=2)
    after_left = []
    for im in made:
        c = canvas.copy()
        c.paste(im, (0, 0))
        after_left.append(c.crop((0, 0, 96, 64)))
    # Right pass: canvas 128x64, mask black to x 94 (128 - 32 - blur), the job the rightmost 64 columns,
    # its latent mask (drawn on the 64-wide job) black to x 28 (64 - 32 - 2 × blur).
    mask = _rect((128, 64), (0, 0, 94, 64))
    canvases = [_noise_canvas(im, (128, 64), (0, 0), mask) for im in after_left]
    made = _job(local, [c.crop((64, 0, 128, 64)) for c in canvases], mask.crop((64, 0, 128, 64)),
                _rect((64, 64), (0, 0, 28, 64)), 11, options, batch_size=2)
    for got, c, im in zip(images[1:], canvases, made):
        c.paste(im, (64, 0))
        assert np.array_equal(np.asarray(got), np.asarray(c))
    assert np.array_equal(np.asarray(images[0]), np.asarray(grids.image_grid(images[1:])))
    texts = info["infotexts"]
    assert len(texts) == 3 and len(set(texts)) == 1  # all the first pass's first infotext
    assert "Seed: 11," in texts[0] and "Size: 64x64" in texts[0] and "Mask blur" not in texts[0]  # x ≠ y
    assert "Denoising strength: 0.8" in texts[0]


def test_outpainting_mk2_all_directions_keeps_the_original(server):
    """All four directions by 32 with mask blur 0: 128x128 (the vertical passes run 128 wide), the original
    exactly in the middle; n_iter 2 of one image each repeats the same seed (A1111 never advances it)."""
    init = _init(seed=8)
    images, info = _post(server, dict(SMALL, init_images=[_b64(init)], seed=3, n_iter=2,
                                      script_name="outpainting mk2", script_args=["", 32, 0]))
    assert [im.size for im in images] == [(256, 128), (128, 128), (128, 128)]
    for im in images[1:]:
        assert np.array_equal(np.asarray(im)[32:96, 32:96], np.asarray(init))
        assert float(np.asarray(im)[:, :32].std()) > 1  # something was painted there
    assert np.array_equal(np.asarray(images[1]), np.asarray(images[2]))
    assert info["width"] == 128 and info["height"] == 64  # Processed(p): the last pass's job size
    one, _ = _post(server, dict(SMALL, init_images=[_b64(init)], seed=3, script_name="outpainting mk2",
                                script_args=["", 32, 0, ["up"]]))
    assert [im.size for im in one] == [(64, 128)]  # one image: no grid (grid_only_if_multiple)


def test_poor_mans_outpainting_as_a1111(server, local):
    """64x64 grown by 32 on every side (16 each way, doubled by the rounding to 128), tiles of 64
    overlapping by 16: 3 x 3 tiles, the middle one wholly original and skipped, 8 jobs with seeds 21…28;
    one image, the tiles blended back, the original's interior kept."""
    init = _init(seed=4)
    images, info = _post(server, dict(SMALL, init_images=[_b64(init)], seed=21, batch_size=2, n_iter=2,
                                      script_name="Poor man's outpainting", script_args=[16, 1, "fill"]))
    assert [im.size for im in images] == [(128, 128)]
    canvas = Image.new("RGB", (128, 128))
    canvas.paste(init, (32, 32))
    mask = _rect((128, 128), (34, 34, 94, 94), "L")  # 2 × blur inside the original
    latent = _rect((128, 128), (32, 32, 96, 96), "L")  # blur // 2 = 0
    grid, mgrid, lgrid = (grids.split_grid(im, 64, 64, 16) for im in (canvas, mask, latent))
    options = inpaint.InpaintOptions(mask_blur_x=2, mask_blur_y=2, inpainting_fill=0, inpaint_full_res=False)
    seed = 21
    for row, mrow, lrow in zip(grid.rows, mgrid.rows, lgrid.rows):
        for tile, m, lm in zip(row.tiles, mrow.tiles, lrow.tiles):
            if (tile.x, row.y) == (32, 32):
                continue
            tile.image = _job(local, [tile.image], m.image, lm.image, seed, options)[0]
            seed += 1
    assert seed == 29
    assert np.array_equal(np.asarray(images[0]), np.asarray(grids.combine_grid(grid)))
    # The blur (σ 2, radius 5) reaches 5 px into the mask's black box: inside that, the original.
    assert np.array_equal(np.asarray(images[0])[40:89, 40:89], np.asarray(init)[8:57, 8:57])
    texts = info["infotexts"]
    assert len(texts) == 1 and "Seed: 21," in texts[0] and "Mask blur: 2" in texts[0]
    assert "Masked content: fill" in texts[0] and "Size: 64x64" in texts[0]


def test_latent_mask_field_over_http(server, local):
    """The API's latent_mask: decoded like the mask, the same image as the engine's."""
    init = _init(seed=6)
    mask, latent = _rect((64, 64), (0, 0, 40, 63), "L"), _rect((64, 64), (0, 0, 20, 63), "L")
    images, _ = _post(server, dict(SMALL, init_images=[_b64(init)], seed=9, mask=_b64(mask),
                                   latent_mask=_b64(latent), inpaint_full_res=False))
    expected = _job(local, [init], mask, latent, 9, inpaint.InpaintOptions(inpaint_full_res=False))[0]
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected))
    assert _post(server, dict(SMALL, init_images=[_b64(init)], mask=_b64(mask), latent_mask="nope"), 400)
    small = _b64(Image.new("L", (32, 32)))  # the fill needs the job's size (A1111 fails too)
    assert _post(server, dict(SMALL, init_images=[_b64(init)], mask=_b64(mask), latent_mask=small,
                              inpaint_full_res=False), 400)


def test_scripts_listed(server):
    got = requests.get(f"{server.url}/sdapi/v1/scripts", auth=(USER, PASSWORD)).json()
    assert "outpainting mk2" in got["img2img"] and "poor man's outpainting" in got["img2img"]
    assert "outpainting mk2" not in got["txt2img"]
    info = requests.get(f"{server.url}/sdapi/v1/script-info", auth=(USER, PASSWORD)).json()
    mk2 = next(s for s in info if s["name"] == "outpainting mk2")
    assert [a["label"] for a in mk2["args"]] == ["", "Pixels to expand", "Mask blur", "Outpainting direction",
                                                 "Fall-off exponent (lower=higher detail)", "Color variation"]
    poor = next(s for s in info if s["name"] == "poor man's outpainting")
    assert [a["label"] for a in poor["args"]] == ["Pixels to expand", "Mask blur", "Masked content",
                                                  "Outpainting direction"]
    assert poor["args"][2]["choices"] == ["fill", "original", "latent noise", "latent nothing"]


HOSTILE = [
    ("outpainting mk2", ["", 4, 8]),                          # pixels below 8
    ("outpainting mk2", ["", 32, 65]),                        # mask blur above 64
    ("outpainting mk2", ["", 32, 8, "left"]),                 # directions not a list
    ("outpainting mk2", ["", 32, 8, ["sideways"]]),           # unknown direction
    ("outpainting mk2", ["", 32, 8, []]),                     # nothing to do
    ("outpainting mk2", ["", 32, 8, ["left"], 9.0]),          # noise_q above 4
    ("outpainting mk2", ["", 32, 8, ["left"], 1.0, "red"]),   # colour variation not a number
    ("outpainting mk2", ["", 32, 64, ["left"]]),              # blur swallows the image: no known pixel
    ("outpainting mk2", ["", 48, 8, ["right"]]),              # latent box reversed (Pillow ≥ 9.5 raises, A1111 too)
    ("outpainting mk2", ["", 32, 8, ["left"], 1.0, 0.05, 1]),  # too many args
    ("poor man's outpainting", [16, 1, 7]),                   # masked content index out of range
    ("poor man's outpainting", [16, 1, "smudge"]),
    ("poor man's outpainting", [64, 1, 0]),                   # overlap = the tile size
    ("poor man's outpainting", [16, 40, 0]),                  # blur box empty
    ("poor man's outpainting", [16, 1, 0, []]),
    ("poor man's outpainting", [True, 1, 0]),
]


@pytest.mark.parametrize("name,args", HOSTILE)
def test_hostile_script_args_are_4xx(server, name, args):
    r = requests.post(f"{server.url}/sdapi/v1/img2img", auth=(USER, PASSWORD), timeout=60,
                      json=dict(SMALL, init_images=[_b64(_init())], script_name=name, script_args=args))
    assert 400 <= r.status_code < 500, (args, r.status_code, r.text[:300])


def test_outpainting_mk2_noise_canvas_is_bounded(server):
    big = _b64(Image.new("RGB", (1536, 1024), (40, 90, 160)))  # grown by 256 left and up: 1792x1280
    r = requests.post(f"{server.url}/sdapi/v1/img2img", auth=(USER, PASSWORD), timeout=60,
                      json=dict(SMALL, init_images=[big], script_name="outpainting mk2",
                                script_args=["", 256, 8, ["left", "up"]]))
    assert r.status_code == 400 and "1792x1280" in r.text, r.text[:300]
