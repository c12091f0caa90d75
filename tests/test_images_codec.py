"""sdfc.api.images against docs/a1111-api.md §1.1, §2.1, §2.3.

Container bytes are inspected with the small independent parsers below, not only through Pillow.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import time
import tracemalloc
import warnings
import zlib

import pytest
from PIL import Image, PngImagePlugin

from sdfc.api.images import (MAX_IMAGE_PIXELS, ImageDecodeError, decode_image, decode_user_comment, encode_image,
                             encode_image_bytes, read_infotext, user_comment_exif)

ASCII_TEXT = "a cat, best quality\nNegative prompt: ugly\nSteps: 20, Sampler: Euler, Seed: 1"
LATIN1_TEXT = "café, crème brûlée\nSteps: 20, Sampler: Euler, Seed: 1"
UNICODE_TEXT = "猫, かわいい 🐱\nNegative prompt: 醜い\nSteps: 20, Sampler: Euler, Seed: 1"


def sample_image(mode="RGB", size=(16, 12)):
    image = Image.linear_gradient("L").resize(size).convert(mode)
    return image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- independent container parsers ------------------------------------------------------------

def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_header(width: int, height: int, extra_chunks: bytes = b"") -> bytes:
    """A tiny PNG that *declares* width x height RGB pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra_chunks
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def tiff_user_comment(tiff: bytes) -> bytes:
    """UserComment (0x9286) from a TIFF/EXIF block, following IFD0 -> Exif IFD pointer (0x8769)."""
    endian = {b"II": "<", b"MM": ">"}[tiff[:2]]

    def entries(offset):
        (count,) = struct.unpack(endian + "H", tiff[offset:offset + 2])
        for i in range(count):
            yield struct.unpack(endian + "HHII", tiff[offset + 2 + 12 * i:offset + 14 + 12 * i])

    (ifd0,) = struct.unpack(endian + "I", tiff[4:8])
    exif_ifd = next(value for tag, _, _, value in entries(ifd0) if tag == 0x8769)
    tag, kind, count, offset = next(e for e in entries(exif_ifd) if e[0] == 0x9286)
    assert kind == 7  # UNDEFINED, as piexif writes it
    return tiff[offset:offset + count]


def jpeg_exif_tiff(data: bytes) -> bytes:
    pos = 2
    while pos < len(data):
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])[0]
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\0\0"):
            return segment[6:]
        pos += 2 + length
    raise AssertionError("no APP1 Exif segment")


def webp_exif_tiff(data: bytes) -> bytes:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    pos = 12
    while pos < len(data):
        kind, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if kind == b"EXIF":
            payload = data[pos + 8:pos + 8 + size]
            return payload[6:] if payload.startswith(b"Exif\0\0") else payload
        pos += 8 + size + (size & 1)
    raise AssertionError("no EXIF chunk")


# --- PNG --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, chunk_type", [
    (ASCII_TEXT, b"tEXt"), (LATIN1_TEXT, b"tEXt"), (UNICODE_TEXT, b"iTXt"),
])
def test_png_round_trip_uses_text_or_itxt(text, chunk_type):
    data = encode_image_bytes(sample_image(), "png", text)
    chunks = png_chunks(data)
    kinds = [kind for kind, _ in chunks]
    assert kinds.index(chunk_type) < kinds.index(b"IDAT")
    payload = next(body for kind, body in chunks if kind == chunk_type)
    if chunk_type == b"tEXt":
        assert payload == b"parameters\0" + text.encode("latin-1")
    else:  # keyword, compression flag 0, method 0, empty language, empty translated keyword, UTF-8
        assert payload == b"parameters\0\0\0\0\0" + text.encode("utf-8")
    assert sum(kind in (b"tEXt", b"iTXt", b"zTXt") for kind in kinds) == 1

    image = decode_image(b64(data))
    assert read_infotext(image) == (text, {})


@pytest.mark.parametrize("text", [ASCII_TEXT, UNICODE_TEXT])
def test_png_compressed_text_chunks_are_read(text):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text, zip=True)  # zTXt for Latin-1, compressed iTXt otherwise
    info.add_text("Software", "other tool")
    buffer = io.BytesIO()
    sample_image().save(buffer, "PNG", pnginfo=info)
    assert read_infotext(decode_image(b64(buffer.getvalue()))) == (text, {"Software": "other tool"})


def test_png_text_after_idat_is_read():
    data = encode_image_bytes(sample_image(), "png")
    chunks = png_chunks(data)
    late = png_chunk(b"tEXt", b"parameters\0late text")
    rebuilt = data[:8] + b"".join(png_chunk(k, v) for k, v in chunks[:-1]) + late + png_chunk(b"IEND", b"")
    assert read_infotext(decode_image(b64(rebuilt)))[0] == "late text"


def test_png_without_infotext_has_no_text_chunk():
    data = encode_image_bytes(sample_image(), "png", None)
    assert not {kind for kind, _ in png_chunks(data)} & {b"tEXt", b"iTXt", b"zTXt"}
    assert encode_image_bytes(sample_image(), "png", "") == data


def test_png_keeps_alpha_and_palette_modes():
    for mode in ("RGBA", "P", "L"):
        assert decode_image(encode_image(sample_image(mode), "png", "x")).mode == mode


# --- JPEG / WebP EXIF UserComment ----------------------------------------------------------

@pytest.mark.parametrize("fmt, exif_of", [("jpeg", jpeg_exif_tiff), ("jpg", jpeg_exif_tiff), ("webp", webp_exif_tiff)])
@pytest.mark.parametrize("text", [ASCII_TEXT, UNICODE_TEXT])
def test_exif_user_comment_round_trip(fmt, exif_of, text):
    data = encode_image_bytes(sample_image(), fmt, text)
    raw = tiff_user_comment(exif_of(data))
    assert raw == b"UNICODE\0" + text.encode("utf-16-be")  # what piexif's UNICODE encoding produces
    image = decode_image(b64(data))
    assert image.format == ("WEBP" if fmt == "webp" else "JPEG")
    assert read_infotext(image) == (text, {})


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "L"])
def test_exif_formats_convert_modes(fmt, mode):
    image = decode_image(encode_image(sample_image(mode), fmt, "t\nSteps: 1, Seed: 2, CFG scale: 3"))
    assert image.mode in ("RGB", "L")
    assert read_infotext(image)[0] == "t\nSteps: 1, Seed: 2, CFG scale: 3"


def test_jpeg_quality_is_applied():
    noisy = Image.effect_noise((64, 64), 60).convert("RGB")
    assert len(encode_image_bytes(noisy, "jpeg", jpeg_quality=30)) < len(encode_image_bytes(noisy, "jpeg",
                                                                                           jpeg_quality=95))


def test_jpeg_rejects_infotext_too_long_for_app1():
    with pytest.raises(ValueError, match="EXIF"):
        encode_image_bytes(sample_image(), "jpeg", "x" * 40000)
    assert read_infotext(decode_image(encode_image(sample_image(), "webp", "x" * 40000)))[0] == "x" * 40000


def test_unknown_encode_format():
    with pytest.raises(ValueError, match="unsupported image format"):
        encode_image_bytes(sample_image(), "gif")


@pytest.mark.parametrize("raw, expected", [
    (b"UNICODE\0" + "猫 cat".encode("utf-16-be"), "猫 cat"),
    (b"UNICODE\0" + "little endian text".encode("utf-16-le"), "little endian text"),
    (b"UNICODE\0" + "\ufeffbom".encode("utf-16-le"), "bom"),
    (b"UNICODE\0" + "\ufeffbom".encode("utf-16-be"), "bom"),
    (b"UNICODE\0", ""),
    (b"ASCII\0\0\0plain ascii\0", "plain ascii"),
    (b"ASCII\0\0\0caf\xc3\xa9", "café"),
    (b"JIS\0\0\0\0\0" + "猫".encode("shift_jis"), "猫"),
    (b"\0" * 8 + b"undefined prefix", "undefined prefix"),
    (b"no prefix at all \xff", "no prefix at all "),
])
def test_decode_user_comment(raw, expected):
    assert decode_user_comment(raw) == expected


def exif_with_comment(raw: bytes, endian: str = "<") -> bytes:
    """EXIF bytes with one UserComment (UNDEFINED), little-endian by default like many other tools."""
    order = b"II" if endian == "<" else b"MM"

    def ifd(tag, kind, count, value):
        return struct.pack(endian + "HHHII", 1, tag, kind, count, value) + struct.pack(endian + "I", 0)

    tiff = order + struct.pack(endian + "HI", 42, 8) + ifd(0x8769, 4, 1, 26) + ifd(0x9286, 7, len(raw), 44) + raw
    return b"Exif\0\0" + tiff


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
@pytest.mark.parametrize("raw, expected", [
    (b"ASCII\0\0\0from another tool", "from another tool"),
    (b"UNICODE\0" + "little-endian writer".encode("utf-16-le"), "little-endian writer"),
    (b"UNICODE\0" + "猫 big-endian".encode("utf-16-be"), "猫 big-endian"),
])
def test_user_comments_written_by_other_tools(fmt, raw, expected):
    buffer = io.BytesIO()
    sample_image().save(buffer, fmt, exif=exif_with_comment(raw))
    assert read_infotext(decode_image(b64(buffer.getvalue())))[0] == expected


def test_exif_comment_wins_over_png_parameters_unless_empty():
    for comment, expected in (("from exif", "from exif"), ("", "from png")):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "from png")
        buffer = io.BytesIO()
        sample_image().save(buffer, "PNG", pnginfo=info, exif=user_comment_exif(comment))
        assert b"eXIf" in buffer.getvalue()
        assert read_infotext(decode_image(b64(buffer.getvalue())))[0] == expected


def test_exif_written_like_piexif_big_endian_undefined():
    exif = user_comment_exif("hé")
    assert exif.startswith(b"Exif\0\0MM\x00\x2a")
    assert tiff_user_comment(exif[6:]) == b"UNICODE\0\x00h\x00\xe9"


# --- other sources, items -------------------------------------------------------------------

def test_gif_comment_and_items():
    buffer = io.BytesIO()
    sample_image().save(buffer, "GIF", comment="gif text")
    text, items = read_infotext(decode_image(b64(buffer.getvalue())))
    assert text == "gif text"
    assert items == {"version": "GIF89a", "comment": "gif text"}  # background/loop/duration are dropped
    json.dumps(items)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_images_without_metadata(fmt):
    buffer = io.BytesIO()
    sample_image().save(buffer, fmt)
    text, items = read_infotext(decode_image(b64(buffer.getvalue())))
    assert text is None
    assert set(items) <= {"compression", "resolution"}  # format facts only; jfif*, dpi, loop... dropped
    json.dumps(items)


def test_items_keep_other_png_text_and_drop_ignored_keys():
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "p")
    info.add_text("Software", "NotNovelAI")
    info.add_text("Comment", '{"json": true}')
    buffer = io.BytesIO()
    sample_image().save(buffer, "PNG", pnginfo=info, dpi=(72, 72), icc_profile=b"fake-icc")
    text, items = read_infotext(decode_image(b64(buffer.getvalue())))
    assert text == "p"
    assert items == {"Software": "NotNovelAI", "Comment": '{"json": true}'}


# --- decoding request values ----------------------------------------------------------------

def test_raw_base64_and_data_uri_decode_the_same():
    data = encode_image_bytes(sample_image(), "png", "x")
    encoded = b64(data)
    variants = [
        encoded,
        f"data:image/png;base64,{encoded}",
        f"DATA:image/jpeg;base64,{encoded}",  # the declared type is not trusted: the bytes decide
        f"  \n{encoded}\n ",
        "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)),  # MIME line wrapping
        encoded.rstrip("="),  # padding dropped
        base64.urlsafe_b64encode(data).decode(),
    ]
    for value in variants:
        image = decode_image(value)
        assert image.size == (16, 12) and image.tobytes() == sample_image().tobytes()


@pytest.mark.parametrize("value, kind, message", [
    ("", "empty", "empty"),
    ("   \n ", "empty", "empty"),
    ("data:image/png;base64,", "empty", "empty"),
    (None, "base64", "base64 string"),
    (b"bytes", "base64", "base64 string"),
    ("http://169.254.169.254/latest/meta-data", "url", "URLs are not supported"),
    ("HTTPS://example.com/cat.png", "url", "URLs are not supported"),
    ("data:image/png,rawnotbase64", "base64", "base64-encoded"),
    ("data:image/png;base64", "base64", "no ','"),
    ("not base64 at all!", "base64", "not valid base64"),
    ("abcde", "base64", "not valid base64"),  # impossible length
    ("ZmFrZQ==é", "base64", "not valid base64"),
    (b64(b"this is plain text, not an image"), "format", "not an image in a supported format"),
    (b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), "format", "supported format"),  # no Ghostscript
])
def test_bad_values_raise_clear_errors(value, kind, message):
    with pytest.raises(ImageDecodeError, match=message) as caught:
        decode_image(value)
    assert caught.value.kind == kind
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_truncated_images_are_refused(fmt):
    noisy = Image.effect_noise((128, 128), 60).convert("RGB")
    data = encode_image_bytes(noisy, fmt)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b64(data[:len(data) // 2]))
    assert caught.value.kind in ("corrupt", "format")
    assert "truncated" in str(caught.value) or "corrupt" in str(caught.value) or "damaged" in str(caught.value)


def test_corrupt_png_body_is_refused():
    data = png_with_header(64, 64)  # IDAT far too short for 64x64 RGB
    with pytest.raises(ImageDecodeError, match="truncated or corrupt") as caught:
        decode_image(b64(data))
    assert caught.value.kind == "corrupt"


def refused_quickly(data: bytes, **kwargs) -> ImageDecodeError:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(b64(data), **kwargs)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 8 * 1024 * 1024  # nowhere near a pixel buffer
    assert caught.value.kind == "too_large"
    return caught.value


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width, height", [
    (50000, 50000),  # beyond Pillow's own hard limit: DecompressionBombError
    (10000, 10000),  # Pillow only warns; our budget refuses
    (4097, 4096),    # just over our default budget
])
def test_decompression_bombs_are_refused_without_allocating(width, height):
    data = png_with_header(width, height)
    assert len(data) < 200
    error = refused_quickly(data)
    assert "too large" in str(error)


def test_bomb_warning_configured_as_error_still_maps_to_our_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refused_quickly(png_with_header(10000, 10000), max_pixels=None)


def test_pixel_budget_is_configurable():
    data = encode_image_bytes(sample_image(size=(64, 64)), "png")
    error = refused_quickly(data, max_pixels=64 * 63)
    assert "64x64" in str(error) and str(64 * 63) in str(error)
    assert decode_image(b64(data), max_pixels=64 * 64).size == (64, 64)
    assert MAX_IMAGE_PIXELS == 4096 * 4096


def test_decoded_image_is_fully_loaded():
    image = decode_image(encode_image(sample_image(), "jpeg"))
    assert image.im is not None  # pixels decoded inside decode_image, not lazily later
