"""The gallery JSON API over the records store (read-only), behind the app's Basic auth.

GET /gallery/api/images                 newest first; ?page, page_size (≤100), q (prompt text), model,
                                        since, until (YYYY-MM-DD or ISO time, UTC; a bare `until` date
                                        includes that whole day)
GET /gallery/api/images/<id>            one record with its infotext (?include=image adds image_base64)
GET /gallery/api/images/<id>/image.png  the image as a PNG download carrying its infotext
GET /gallery/api/models                 the model names present, for a filter
"""
from __future__ import annotations

import base64
import io
from datetime import datetime, timedelta, timezone

from flask import Blueprint, Response, json, request

from .store import GalleryQuery, RecordStore, StoreUnavailable

MAX_PAGE_SIZE = 100


class BadParameter(ValueError):
    pass


def _error(status: int, error: str, detail: str) -> Response:
    # The API's error shape ({error, detail, body, errors}), so clients parse one format.
    return Response(json.dumps({"error": error, "detail": detail, "body": "", "errors": detail},
                               ensure_ascii=False), status=status, mimetype="application/json")


def _json(payload, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status, mimetype="application/json")


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadParameter(f"{name} must be between {low} and {high}, got {value}")
    return value


def _time_arg(name: str, end_of_day: bool = False) -> datetime | None:
    raw = (request.args.get(name) or "").strip()
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadParameter(f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 time, got {raw!r}") from None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    if end_of_day and len(raw) == 10:
        when += timedelta(days=1)
    return when


def _number(value):
    """Stored as varchar (the original schema); answered as numbers where they are numbers."""
    if value is None:
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def _item(row: dict, detail: bool = False) -> dict:
    created = row.get("created_at")
    item = {
        "id": row["id"], "request_id": row.get("request_id"), "image_index": row.get("image_index"),
        "created_at": created.isoformat(timespec="milliseconds") + "Z" if created else None,
        "prompt": row.get("prompt"), "negative_prompt": row.get("negative_prompt"),
        "steps": _number(row.get("steps")), "seed": _number(row.get("seed")), "sampler": row.get("sampler"),
        "cfg_scale": _number(row.get("cfg_scale")), "size": row.get("size"),
        "model_hash": row.get("model_hash"), "model": row.get("model"),
        "image_format": row.get("image_format") or "png",
        "image_url": f"/gallery/api/images/{row['id']}/image.png",
    }
    if detail:
        item["infotext"] = row.get("infotext")
    if "image_base64" in row:
        item["image_base64"] = row["image_base64"]
    return item


def png_with_infotext(data: bytes, infotext: str | None) -> bytes:
    """The stored bytes when they are already a PNG carrying the infotext; else re-encoded as one."""
    from PIL import Image, PngImagePlugin

    image = Image.open(io.BytesIO(data))
    if image.format == "PNG" and (not infotext or image.text.get("parameters") == infotext):
        return data
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_itxt("parameters", infotext)  # iTXt: UTF-8, like A1111 for non-Latin-1 text
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def make_gallery_blueprint(store: RecordStore) -> Blueprint:
    bp = Blueprint("gallery", __name__, url_prefix="/gallery/api")

    @bp.errorhandler(BadParameter)
    def _bad(exc):
        return _error(400, "ValueError", str(exc))

    @bp.errorhandler(StoreUnavailable)
    def _unavailable(exc):
        return _error(503, "StoreUnavailable", f"the records database is not reachable: {exc}")

    @bp.get("/images")
    def list_images():
        query = GalleryQuery(
            text=request.args.get("q") or None, model=request.args.get("model") or None,
            since=_time_arg("since"), until=_time_arg("until", end_of_day=True),
            page=_int_arg("page", 1, 1, 10**6), page_size=_int_arg("page_size", 20, 1, MAX_PAGE_SIZE))
        rows, total = store.query(query)
        return _json({"items": [_item(r) for r in rows], "page": query.page, "page_size": query.page_size,
                      "total": total, "pages": (total + query.page_size - 1) // query.page_size})

    @bp.get("/images/<int:record_id>")
    def one_image(record_id: int):
        row = store.get(record_id, with_image=request.args.get("include") == "image")
        if row is None:
            return _error(404, "NotFound", f"no image with id {record_id}")
        return _json(_item(row, detail=True))

    @bp.get("/images/<int:record_id>/image.png")
    def download(record_id: int):
        row = store.get(record_id, with_image=True)
        if row is None or not row.get("image_base64"):
            return _error(404, "NotFound", f"no image with id {record_id}")
        data = png_with_infotext(base64.b64decode(row["image_base64"]), row.get("infotext"))
        name = f"sdfc-{record_id}-{row.get('seed') or 'image'}.png"
        return Response(data, mimetype="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @bp.get("/models")
    def models():
        return _json({"models": store.models()})

    return bp
