"""Images in and out of the A1111 API: base64 decoding, encoding with the infotext, png-info reading.

Reference: docs/a1111-api.md §1.1 (images in requests/responses), §2.1 (png-info), §2.3 (storage).
Pure Pillow, no I/O beyond memory buffers. Implemented from the spec, not copied from A1111.

URL policy: A1111 fetches `http(s)://` image values (option `api_enable_requests`). We never do:
a serverless function that fetches caller-chosen URLs is an SSRF vector (cloud metadata
endpoints, VPC-internal services) and would spend the request's time budget on downloads.
Such values fail with ImageDecodeError(kind="url").
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import zlib
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

# Pixel budget for decoded request images (default 4096*4096 = 16.7 MP, about 50 MiB as RGB).
# Checked from the header before any pixel is decoded. Pillow's own process-wide bomb check
# (Image.MAX_IMAGE_PIXELS, ~89 MP) still applies on top, so a larger limit passed here is capped
# at 2x Pillow's value; we do not touch Pillow's global.
MAX_IMAGE_PIXELS = 4096 * 4096

# Formats we let Pillow try. A1111 accepts anything Pillow opens; we skip the exotic plugins
# (EPS would run Ghostscript, others see little fuzzing) since no API client sends them.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

ENCODE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

INFOTEXT_KEY = "parameters"  # PNG text-chunk keyword A1111 reads and writes
EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_UNICODE = b"UNICODE\0"
USER_COMMENT_ASCII = b"ASCII\0\0\0"
USER_COMMENT_JIS = b"JIS\0\0\0\0\0"
USER_COMMENT_UNDEFINED = b"\0" * 8

# image.info entries png-info does not report under `items` (§2.1); `jfif*` is a prefix rule.
IGNORED_INFO_KEYS = frozenset({
    "parameters", "exif", "dpi", "icc_profile", "loop", "background", "timestamp", "duration",
    "progressive", "progression", "chromaticity", "photoshop",
})
IGNORED_INFO_PREFIXES = ("jfif",)

_DATA_URI_RE = re.compile(r"^data:([^,]*),(.*)$", re.DOTALL | re.IGNORECASE)
_WHITESPACE_RE = re.compile(r"\s+")


class ImageDecodeError(ValueError):
    """A request image that cannot be used. The route answers 500 `Invalid encoded image` (§1.7).

    `kind` says why: "empty", "url", "base64", "format", "corrupt" or "too_large".
    """

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------
# Decoding request images
# ---------------------------------------------------------------------------------------------


def decode_image(value: Any, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a request image: raw base64 or `data:image/<x>;base64,<b64>` (§1.1).

    The image is fully loaded (so truncation shows up here) and keeps its `info` metadata for
    read_infotext. Raises ImageDecodeError for anything unusable; `max_pixels=None` leaves only
    Pillow's own bomb check.
    """
    data = decode_base64_payload(value)
    return open_image_bytes(data, max_pixels)


def decode_base64_payload(value: Any) -> bytes:
    """The raw bytes of a base64 / data-URI image value, or ImageDecodeError."""
    if not isinstance(value, str):
        raise ImageDecodeError(f"image must be a base64 string, not {type(value).__name__}", "base64")
    text = value.strip()
    if not text:
        raise ImageDecodeError("image is empty", "empty")
    if text[:8].lower().startswith(("http://", "https://")):
        raise ImageDecodeError("image URLs are not supported; send the image as base64 or a data: URI", "url")
    if text[:5].lower() == "data:":
        text = _data_uri_payload(text)
    return _b64decode(text)


def _data_uri_payload(text: str) -> str:
    match = _DATA_URI_RE.match(text)
    if not match:
        raise ImageDecodeError("data URI has no ',' before its data", "base64")
    header, payload = match.groups()
    if "base64" not in header.lower().split(";"):
        raise ImageDecodeError("data URI must be base64-encoded (';base64,')", "base64")
    if not payload.strip():
        raise ImageDecodeError("image is empty", "empty")
    return payload


def _b64decode(text: str) -> bytes:
    # JSON producers wrap lines, some use the URL-safe alphabet or drop padding: accept all three.
    compact = _WHITESPACE_RE.sub("", text).translate(str.maketrans("-_", "+/"))
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageDecodeError(f"image is not valid base64: {error}", "base64") from None
    if not data:
        raise ImageDecodeError("image is empty", "empty")
    return data


def open_image_header(value: Any, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """A request image opened from its header only: size and format known, no pixel decoded.

    Lets a caller check sizes and counts of every image before it decodes any (then load_image).
    """
    return _open_lazily(decode_base64_payload(value), max_pixels)


def load_image(image: Image.Image) -> Image.Image:
    """Decode the pixels of an image from open_image_header (ImageDecodeError when they are broken)."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"image is too large: {error}", "too_large") from None
    except MemoryError:
        raise ImageDecodeError("image is too large to decode in the memory left", "too_large") from None
    except Exception as error:
        # OSError "image file is truncated" (Pillow's default LOAD_TRUNCATED_IMAGES=False), ValueError
        # for Pillow's text-chunk size limits, and whatever else a plugin raises on hostile data.
        raise ImageDecodeError(f"image data is truncated or corrupt: {error}", "corrupt") from None
    return image


def open_image_bytes(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode image bytes, refusing oversized images before decoding pixels."""
    return load_image(_open_lazily(data, max_pixels))


def _open_lazily(data: bytes, max_pixels: int | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # The Warning arrives as an exception only where warnings are configured as errors.
        raise ImageDecodeError(f"image is too large: {error}", "too_large") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("data is not an image in a supported format "
                               f"({', '.join(_allowed_formats())}), or its header is damaged", "format") from None
    except Exception as error:  # plugins raise assorted types on hostile input; all mean "corrupt"
        raise ImageDecodeError(f"image header is corrupt: {error}", "corrupt") from None

    _check_pixel_budget(image, max_pixels)
    return image


def _check_pixel_budget(image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an invalid size {width}x{height}", "corrupt")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image is too large: {width}x{height} = {width * height} pixels, limit {max_pixels}", "too_large")


def _allowed_formats() -> list[str]:
    # Image.open raises KeyError for a format name no plugin registered (e.g. AVIF on old builds).
    Image.init()
    return [name for name in ALLOWED_FORMATS if name in Image.OPEN]


# ---------------------------------------------------------------------------------------------
# Encoding response images
# ---------------------------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str = "png", infotext: str | None = None,
                 jpeg_quality: int = 80) -> str:
    """Raw base64 (no `data:` prefix) of encode_image_bytes, as A1111 responses carry images."""
    return base64.b64encode(encode_image_bytes(image, fmt, infotext, jpeg_quality)).decode("ascii")


def encode_image_bytes(image: Image.Image, fmt: str = "png", infotext: str | None = None,
                       jpeg_quality: int = 80) -> bytes:
    """Encode `image` as png / jpeg (jpg) / webp with the infotext embedded as A1111 does (§2.3).

    PNG: a `parameters` tEXt chunk (iTXt when the text is not Latin-1), before IDAT, uncompressed.
    JPEG/WebP: EXIF UserComment = b"UNICODE\\0" + UTF-16BE text; converted to RGB first (JPEG
    also for other modes it cannot store). No infotext (None or "") means no metadata at all.
    JPEG raises ValueError when the EXIF block exceeds its 64 KiB segment (~32k characters).
    """
    pillow_format = ENCODE_FORMATS.get(fmt.lower())
    if pillow_format is None:
        raise ValueError(f"unsupported image format {fmt!r}; use one of {sorted(ENCODE_FORMATS)}")
    buffer = io.BytesIO()
    if pillow_format == "PNG":
        _save_png(image, buffer, infotext)
    else:
        _save_exif_format(image, buffer, pillow_format, infotext, jpeg_quality)
    return buffer.getvalue()


def _save_png(image: Image.Image, buffer: io.BytesIO, infotext: str | None) -> None:
    pnginfo = None
    if infotext:
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text(INFOTEXT_KEY, infotext)  # Pillow picks tEXt or iTXt by Latin-1 encodability
    image.save(buffer, format="PNG", pnginfo=pnginfo)


def _save_exif_format(image: Image.Image, buffer: io.BytesIO, pillow_format: str, infotext: str | None,
                      quality: int) -> None:
    if image.mode in ("RGBA", "P") or (pillow_format == "JPEG" and image.mode not in ("RGB", "L")):
        image = image.convert("RGB")
    options: dict[str, Any] = {"quality": quality}
    if infotext:
        options["exif"] = user_comment_exif(infotext)
    try:
        image.save(buffer, format=pillow_format, **options)
    except ValueError as error:
        raise ValueError(f"cannot write {pillow_format} with this infotext: {error}") from error


def user_comment_exif(text: str) -> bytes:
    """An EXIF block (b"Exif\\0\\0" + TIFF) holding only the Exif IFD's UserComment, as A1111 writes it.

    Built by hand because Pillow's Exif writer types UserComment as BYTE; the EXIF spec and
    A1111's reader (piexif) need UNDEFINED: piexif hands BYTE values back as a tuple of ints,
    on which A1111's png-info fails. Big-endian like piexif.dump; the text is UNICODE (UTF-16BE).
    """
    comment = USER_COMMENT_UNICODE + text.encode("utf-16-be")
    ifd0_offset = 8
    exif_ifd_offset = ifd0_offset + _IFD_SIZE_ONE_ENTRY
    comment_offset = exif_ifd_offset + _IFD_SIZE_ONE_ENTRY
    tiff = (b"MM\x00\x2a" + struct.pack(">I", ifd0_offset)
            + _one_entry_ifd(EXIF_IFD_POINTER, _TIFF_LONG, 1, exif_ifd_offset)
            + _one_entry_ifd(EXIF_USER_COMMENT, _TIFF_UNDEFINED, len(comment), comment_offset)
            + comment)
    return b"Exif\x00\x00" + tiff


_TIFF_LONG = 4
_TIFF_UNDEFINED = 7
_IFD_SIZE_ONE_ENTRY = 2 + 12 + 4  # entry count, one 12-byte entry, next-IFD offset


def _one_entry_ifd(tag: int, field_type: int, count: int, value_or_offset: int) -> bytes:
    return struct.pack(">HHHII", 1, tag, field_type, count, value_or_offset) + struct.pack(">I", 0)


# ---------------------------------------------------------------------------------------------
# Reading the infotext back (png-info)
# ---------------------------------------------------------------------------------------------


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PIXEL_CHUNKS = (b"IDAT", b"fdAT")


def read_image_metadata(value: Any, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[str | None, dict[str, Any]]:
    """read_infotext of a request image without decoding its pixels (png-info needs metadata only).

    A PNG's text chunks may follow its pixel data, which Pillow reads only by decoding it: the pixel
    chunks are dropped first, so that every chunk is read at open. Other formats keep their metadata
    ahead of the pixels (JPEG/WebP EXIF, GIF comments) and are read from the header. The pixel budget
    holds as for every request image, checked from the header.
    """
    data = decode_base64_payload(value)
    image = _open_lazily(data, max_pixels)
    if data.startswith(PNG_SIGNATURE):
        image = _open_lazily(_png_without_pixels(data), None)
    return read_infotext(image, decode=False)


def _png_without_pixels(data: bytes) -> bytes:
    kept, pos = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        end = pos + 12 + length  # length, type, data, CRC
        if end > len(data):
            break  # a truncated chunk: keep what was whole, as a lenient reader would
        kind = data[pos + 4:pos + 8]
        if kind == b"IHDR" and length >= 8:
            # No pixel will be read: claim 1x1, so that no size (nor Pillow's bomb check) matters.
            body = struct.pack(">II", 1, 1) + data[pos + 16:pos + 8 + length]
            kept.append(data[pos:pos + 8] + body + struct.pack(">I", zlib.crc32(kind + body)))
        elif kind not in _PNG_PIXEL_CHUNKS:
            kept.append(data[pos:end])
        pos = end
    return b"".join(kept)


def read_infotext(image: Image.Image, decode: bool = True) -> tuple[str | None, dict[str, Any]]:
    """(generation text or None, other metadata `items`) for png-info (§2.1).

    Text sources: the PNG `parameters` chunk (tEXt/iTXt/zTXt); an EXIF UserComment wins over it
    when present and non-empty; a `comment` (GIF, also JPEG COM) only when neither gave text.
    `items` is image.info minus IGNORED_INFO_KEYS / `jfif*`, made JSON-safe (bytes decoded as
    UTF-8 with replacement, tuples as lists, other objects as str). NovelAI conversion is not done.
    """
    if decode:
        _load_quietly(image)
    info = dict(image.info or {})
    text = _as_text(info.get(INFOTEXT_KEY))
    exif_comment = exif_user_comment(image)
    if exif_comment:
        text = exif_comment
    if text is None and "comment" in info:
        text = _as_text(info["comment"])
    return text, _info_items(info)


def exif_user_comment(image: Image.Image) -> str | None:
    """The decoded EXIF UserComment, or None when there is none."""
    try:
        raw = image.getexif().get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)
    except Exception:  # malformed EXIF must not break png-info; Pillow raises assorted errors
        return None
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw.rstrip("\0")
    return decode_user_comment(bytes(raw))


def decode_user_comment(raw: bytes) -> str:
    """Decode an EXIF UserComment value: 8-byte charset prefix, then the text.

    UNICODE is read as UTF-16BE, which is what A1111 (piexif) writes in every EXIF byte order;
    a BOM or a clearly little-endian byte pattern (other tools follow the TIFF byte order) is
    honoured. ASCII is read as UTF-8 (writers put UTF-8 there), JIS as Shift-JIS; anything else
    falls back to a lenient UTF-8 decode.
    """
    prefix, body = raw[:8], raw[8:]
    if prefix == USER_COMMENT_UNICODE:
        text = body.decode(_utf16_codec(body), errors="replace")
    elif prefix == USER_COMMENT_ASCII:
        text = body.decode("utf-8", errors="replace")
    elif prefix == USER_COMMENT_JIS:
        text = body.decode("shift_jis", errors="replace")
    elif prefix == USER_COMMENT_UNDEFINED:
        text = body.decode("utf-8", errors="ignore")
    else:
        text = raw.decode("utf-8", errors="ignore")
    return text.lstrip("\ufeff").strip("\0")


def _utf16_codec(body: bytes) -> str:
    if body[:2] == b"\xff\xfe":
        return "utf-16-le"
    if body[:2] == b"\xfe\xff":
        return "utf-16-be"
    # Mostly-ASCII text has its zero bytes at odd offsets when little-endian.
    zeros_at_even = body[0::2].count(0)
    zeros_at_odd = body[1::2].count(0)
    return "utf-16-le" if zeros_at_odd > zeros_at_even else "utf-16-be"


def _load_quietly(image: Image.Image) -> None:
    # PNG text chunks after IDAT only appear in image.info once the image is loaded.
    try:
        image.load()
    except Exception:
        pass


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="ignore")
    return str(value)  # also turns PngImagePlugin.iTXt into a plain str


def _info_items(info: dict[str, Any]) -> dict[str, Any]:
    return {
        str(key): _json_safe(value)
        for key, value in info.items()
        if key not in IGNORED_INFO_KEYS and not str(key).startswith(IGNORED_INFO_PREFIXES)
    }


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    return str(value)

