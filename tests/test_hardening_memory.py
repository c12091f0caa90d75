"""Issue 15 class 6, memory: limits derived from memory, image counts and sizes checked before decoding,
only used images decoded, allocation failures answered 503 with the process still serving.

The live servers run under `ulimit -v` (RLIMIT_AS): a request that slipped past the limits would fail
inside the server (and answer 500 or take it down) instead of merely slowing this machine.
"""
from __future__ import annotations

import base64
import io
import resource
import struct
import time
import zlib

import pytest
import requests
from PIL import Image

from sdfc.api.images import read_image_metadata
from sdfc.config import TINY_MODELS_DIR, Settings
from sdfc.engine.memory import memory_profile, parse_bytes
from tests.live_server import PASSWORD, USER, LiveServer, start_server

ADDRESS_SPACE = 3 * 2**30  # the tiny model serves in ~0.7 GiB of address space; 3 GiB leaves room for jobs
CREDENTIALS = (USER, PASSWORD)
SMALL = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 1}
TINY = TINY_MODELS_DIR / "tiny-sd"


def _limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def start_limited_server(tmp, env: dict) -> LiveServer:
    """A server under `ulimit -v`; the limits it derives are its own unless the test sets them."""
    unset = tuple(name for name in ("SDFC_MAX_PIXELS", "SDFC_MEMORY_BUDGET") if name not in env)
    return start_server(tmp, env={"SDFC_THREADS": "2", **env}, unset=unset, preexec_fn=_limit_address_space)


def post(server, route, body, timeout=60):
    return requests.post(server.url + route, json=body, auth=CREDENTIALS, timeout=timeout)


def peak_rss(server) -> int:
    with open(f"/proc/{server.process.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def png_b64(image: Image.Image, pnginfo=None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_header(width: int, height: int, text_after_pixels: str | None = None) -> bytes:
    """A PNG claiming `width`x`height` whose pixel data is a few bytes (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [_chunk(b"IHDR", ihdr), _chunk(b"IDAT", zlib.compress(b"\0" * 64))]
    if text_after_pixels is not None:
        chunks.append(_chunk(b"tEXt", b"parameters\0" + text_after_pixels.encode("latin-1")))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _chunk(b"IEND", b"")


def assert_limit(response, variable: str):
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"} and variable in body["detail"], body


def assert_healthy(server):
    r = post(server, "/sdapi/v1/txt2img", SMALL)
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (64, 64)


# ---------------------------------------------------------------------------------------------
# The estimate and the derived limits (no server)
# ---------------------------------------------------------------------------------------------


def test_estimate_matches_the_tiny_models_measured_peaks():
    profile = memory_profile(TINY, "fp32")
    # Peak RSS above the loaded model, measured with one step (sdfc/engine/memory.py's docstring).
    for (size, batch), kib in {(512, 1): 541_252, (640, 1): 1_334_040, (640, 2): 2_671_492}.items():
        measured = kib * 1024
        estimate = profile.request_bytes(size, size, batch_size=batch, n_images=batch)
        assert measured <= estimate <= 1.25 * measured, (size, batch, estimate)
    # Quadratic in the area: 2048² costs 256 × 512² in attention, which no default may admit.
    assert profile.request_bytes(2048, 2048) > 100 * profile.request_bytes(512, 512)


def test_default_pixel_limit_follows_the_budget():
    profile = memory_profile(TINY, "fp32")
    assert 500**2 < profile.max_pixels(parse_bytes("600M")) < 560**2
    assert profile.max_pixels(parse_bytes("4G")) < 1024**2 < profile.max_pixels(parse_bytes("16G"))
    settings = Settings.from_env({"SDFC_MEMORY_BUDGET": "1.5G"})
    assert settings.memory_budget == int(1.5 * 2**30) and settings.max_pixels is None


def test_png_info_reads_text_after_the_pixels_without_decoding_them():
    # 4000² decodes to 48 MB (and these pixels are not even there); the metadata needs none of it.
    data = png_from_header(4000, 4000, text_after_pixels="a cat\nSteps: 3, Seed: 7")
    text, _ = read_image_metadata(base64.b64encode(data).decode())
    assert text == "a cat\nSteps: 3, Seed: 7"


# ---------------------------------------------------------------------------------------------
# A server under `ulimit -v`, limits derived from the memory it has
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    server = start_limited_server(tmp_path_factory.mktemp("memory"), {})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def blank_4096_png():
    return png_b64(Image.new("RGB", (4096, 4096)))


def test_default_limits_refuse_sizes_the_memory_cannot_hold(limited):
    started = time.monotonic()
    r = post(limited, "/sdapi/v1/txt2img", {**SMALL, "width": 2048, "height": 2048})
    assert_limit(r, "SDFC_MAX_PIXELS")
    assert "memory budget" in r.json()["detail"]
    # Within the pixel limit, but the batch multiplies the attention memory.
    r = post(limited, "/sdapi/v1/txt2img", {**SMALL, "width": 512, "height": 512, "batch_size": 16})
    assert_limit(r, "SDFC_MEMORY_BUDGET")
    assert time.monotonic() - started < 10
    assert_healthy(limited)


def test_seed_resize_is_bounded_like_the_size(limited):
    r = post(limited, "/sdapi/v1/txt2img", {**SMALL, "seed_resize_from_w": 200_000, "seed_resize_from_h": 200_000})
    assert_limit(r, "SDFC_MAX_PIXELS")
    assert "seed resize" in r.json()["detail"]
    assert_healthy(limited)


def test_too_many_init_images_are_refused_before_decoding(limited, blank_4096_png):
    # ~40 × 50 MB decoded, in a body of well under 2 MB.
    r = post(limited, "/sdapi/v1/img2img", {**SMALL, "init_images": [blank_4096_png] * 40})
    assert_limit(r, "SDFC_MAX_IMAGES")
    assert_healthy(limited)


def test_only_the_init_images_used_are_decoded(limited, blank_4096_png):
    before = peak_rss(limited)
    # batch_size 1 uses init_images[0]: the 15 others (750 MB decoded) must stay undecoded.
    r = post(limited, "/sdapi/v1/img2img", {**SMALL, "init_images": [blank_4096_png] * 16,
                                            "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    assert peak_rss(limited) - before < 300 * 2**20


def test_decompression_bomb_and_oversized_images_are_refused(limited):
    bomb = base64.b64encode(png_from_header(100_000, 100_000)).decode()
    big = base64.b64encode(png_from_header(5000, 5000)).decode()
    for route, body in (("/sdapi/v1/img2img", {**SMALL, "init_images": [bomb]}),
                        ("/sdapi/v1/img2img", {**SMALL, "init_images": [big]}),
                        ("/sdapi/v1/extra-single-image", {"image": bomb, "upscaling_resize": 1}),
                        ("/sdapi/v1/extra-batch-images", {"imageList": [{"data": big, "name": "x"}]})):
        r = post(limited, route, body, timeout=20)
        assert r.status_code == 400 and "too large" in r.json()["detail"], (route, r.text)
    assert_healthy(limited)


def test_extras_batch_bounds_the_image_count(limited):
    small = png_b64(Image.new("RGB", (8, 8)))
    r = post(limited, "/sdapi/v1/extra-batch-images",
             {"imageList": [{"data": small, "name": str(i)} for i in range(17)], "upscaling_resize": 1})
    assert_limit(r, "SDFC_MAX_IMAGES")
    r = post(limited, "/sdapi/v1/extra-batch-images",
             {"imageList": [{"data": small, "name": str(i)} for i in range(3)], "upscaling_resize": 2,
              "upscaler_1": "Lanczos"})
    assert r.status_code == 200 and len(r.json()["images"]) == 3, r.text


def test_png_info_reads_only_metadata(limited):
    # The pixel data is a stub (decoding would fail or take 48 MB): png-info never decodes it.
    data = png_from_header(4000, 4000, text_after_pixels="a dog\nSteps: 5, Seed: 3")
    r = post(limited, "/sdapi/v1/png-info", {"image": base64.b64encode(data).decode()})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == "a dog\nSteps: 5, Seed: 3"
    # Sizes beyond the pixel budget are still refused from the header.
    r = post(limited, "/sdapi/v1/png-info", {"image": base64.b64encode(png_from_header(50000, 50000)).decode()})
    assert r.status_code == 400 and "too large" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------
# An allocation failure (limits set too high on purpose) answers 503 and leaves the server serving
# ---------------------------------------------------------------------------------------------


def test_allocation_failure_is_a_503_and_the_next_request_works(tmp_path):
    server = start_limited_server(tmp_path, {"SDFC_MAX_PIXELS": str(2048 * 2048), "SDFC_MEMORY_BUDGET": "1T"})
    try:
        assert_healthy(server)
        started = time.monotonic()
        # 1024² needs ~9 GB of attention scores: more than the 3 GiB of address space the server has.
        r = post(server, "/sdapi/v1/txt2img", {**SMALL, "width": 1024, "height": 1024}, timeout=120)
        assert r.status_code == 503, r.text
        assert r.headers.get("Retry-After") and r.json()["error"] == "OutOfMemoryError"
        assert time.monotonic() - started < 60
        assert_healthy(server)
        assert_healthy(server)
    finally:
        server.stop()
