"""The record event: what the sd-api process sends the writer, and how the writer turns it into a row.

An event is JSON metadata plus the image's key in the outputs store, never the image itself. It is encoded as
ASCII JSON (any string survives the trip, even one that cannot be stored; the writer then refuses it by name).
An event larger than the transport allows (FC: 128 KB asynchronous bodies; long prompts repeat in the
infotext) is spilled: the full event goes to the outputs store and the event sent carries its key.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from datetime import datetime, timezone

from .outputs import BadKey, OutputsStore
from .schema import COLUMN_BY_NAME

EVENT_VERSION = 1
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
IMAGE_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
TEXT_FIELDS = ("prompt", "negative_prompt", "infotext")
VARCHAR_FIELDS = ("steps", "seed", "sampler", "cfg_scale", "size", "model_hash", "model")
# Who generated the image and what it cost (absent from older events and spool entries: stored as NULL).
ACCOUNT_TEXT_FIELDS = ("user", "task_id")
ACCOUNT_NUMBER_FIELDS = ("gpu_seconds", "cost")


class RecordRejected(ValueError):
    """An event that can never be stored as it is (bad shape, value too large for its column).

    Permanent: retrying cannot help, so dispatchers set it aside (dead letters) instead of retrying.
    """


class ImageNotReady(RuntimeError):
    """The event's image is not (yet) readable in the outputs store: transient, retried."""


def safe_request_id(request_id: str) -> str:
    """The request id as stored and used in file names: kept when it is a plain id, else a stable hash
    (the same input always gives the same id, so redelivery stays idempotent)."""
    request_id = str(request_id)
    if REQUEST_ID_PATTERN.fullmatch(request_id):
        return request_id
    return "h-" + hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def image_key(request_id: str, image_index: int, image_format: str, when: datetime) -> str:
    ext = IMAGE_FORMATS.get(str(image_format).lower(), "png")
    return f"{when:%Y/%m/%d}/{safe_request_id(request_id)}-{int(image_index)}.{ext}"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def event_from_generation(record: dict, key: str, created_at: datetime) -> dict:
    """One record from the API (see sdfc/api/generation.py) → the event, without the image bytes."""
    data = record["image_bytes"]
    return {
        "v": EVENT_VERSION,
        "request_id": safe_request_id(record["request_id"]),
        "image_index": int(record["image_index"]),
        "created_at": created_at.astimezone(timezone.utc).isoformat(timespec="milliseconds"),
        "image_key": key,
        "image_format": IMAGE_FORMATS.get(str(record.get("image_format", "png")).lower(), "png"),
        "image_sha256": hashlib.sha256(data).hexdigest(),
        "image_bytes": len(data),
        **{name: record.get(name) for name in TEXT_FIELDS + VARCHAR_FIELDS + ACCOUNT_TEXT_FIELDS
           + ACCOUNT_NUMBER_FIELDS},
    }


def spill_key(event: dict) -> str:
    return f"events/{event['request_id']}-{event['image_index']}.json"


def encode_event(event: dict, outputs: OutputsStore | None = None, max_bytes: int | None = None) -> bytes:
    body = json.dumps(event, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if max_bytes is None or len(body) <= max_bytes:
        return body
    if outputs is None:
        raise RecordRejected(f"event of {len(body)} bytes exceeds {max_bytes} and no outputs store to spill to")
    key = spill_key(event)
    outputs.put(key, body)
    small = {"v": EVENT_VERSION, "request_id": event["request_id"], "image_index": event["image_index"],
             "event_key": key}
    return json.dumps(small, separators=(",", ":")).encode("ascii")


def decode_event(body, outputs: OutputsStore) -> dict:
    """Bytes, str or dict → the full event (a spilled one read back from the outputs store)."""
    event = body
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body).decode("utf-8", "strict") if body else ""
    if isinstance(body, str):
        try:
            event = json.loads(body)
        except ValueError as exc:
            raise RecordRejected(f"event is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise RecordRejected("event must be a JSON object")
    if event.get("v") != EVENT_VERSION:
        raise RecordRejected(f"unsupported event version {event.get('v')!r} (this writer reads {EVENT_VERSION})")
    if "event_key" in event:
        try:
            spilled = outputs.get(event["event_key"])
        except BadKey as exc:
            raise RecordRejected(str(exc)) from None
        except FileNotFoundError:
            raise ImageNotReady(f"spilled event {event['event_key']!r} not found in the outputs store") from None
        return decode_event(spilled, outputs)
    return event


def _text(event: dict, name: str, required: bool = False) -> str | None:
    value = event.get(name)
    if value is None:
        if required:
            raise RecordRejected(f"{name} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordRejected(f"{name} must be a string or a number, got {type(value).__name__}")
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordRejected(f"{name} is not valid Unicode (lone surrogate)") from None
    column = COLUMN_BY_NAME[name]
    size = len(text) if column.chars else len(encoded)
    if column.max_bytes is not None and size > column.max_bytes:
        unit = "characters" if column.chars else "bytes"
        raise RecordRejected(f"{name} is {size} {unit}; column {column.name} {column.mysql} holds "
                             f"{column.max_bytes}")
    return text


def _amount(event: dict, name: str) -> float | None:
    """A finite, non-negative number (seconds, money) or None; anything else can never be summed."""
    value = event.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordRejected(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any double
        raise RecordRejected(f"{name} is too large for a double") from None
    if not math.isfinite(number) or number < 0:
        raise RecordRejected(f"{name} must be a finite non-negative number, got {value!r}")
    return number


def parse_created_at(value) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise RecordRejected(f"created_at {value!r} is not an ISO 8601 time") from None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when  # naive UTC, as stored


def row_from_event(event: dict) -> dict:
    """The event → column values, checked against the column types (never truncated); the image comes next."""
    index = event.get("image_index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**31:
        raise RecordRejected(f"image_index must be a non-negative integer, got {index!r}")
    request_id = _text(event, "request_id", required=True)
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise RecordRejected(f"request_id {request_id!r} is not a plain id")
    row = {"request_id": request_id, "image_index": index, "created_at": parse_created_at(event.get("created_at"))}
    for name in TEXT_FIELDS + VARCHAR_FIELDS:
        row[name] = _text(event, name)
    for name in ("prompt", "negative_prompt"):
        row[name] = row[name] or ""
    row["image_key"] = _text(event, "image_key")
    row["image_format"] = _text(event, "image_format")
    for name in ACCOUNT_TEXT_FIELDS:
        row[name] = _text(event, name)
    for name in ACCOUNT_NUMBER_FIELDS:
        row[name] = _amount(event, name)
    return row


def add_image(row: dict, image: bytes) -> dict:
    row["image_base64"] = base64.b64encode(image).decode("ascii")
    if len(row["image_base64"]) > COLUMN_BY_NAME["image_base64"].max_bytes:
        raise RecordRejected(f"image of {len(image)} bytes is too large for image_base64 mediumtext "
                             f"({len(row['image_base64'])} base64 bytes)")
    return row
