"""The gallery JSON API over the records store (read-only), behind the app's Basic auth.

GET /gallery/api/images                 newest first; ?page, page_size (≤100), q (prompt text), model,
                                        since, until (YYYY-MM-DD or ISO time, UTC; a bare `until` date
                                        includes that whole day)
GET /gallery/api/images/<id>            one record with its infotext (?include=image adds image_base64)
GET /gallery/api/images/<id>/image.png  the image as a PNG download carrying its infotext
GET /gallery/api/models                 the model names present, for a filter
GET /gallery/api/usage                  images, gpu_seconds and cost in total and per UTC day, model and user;
                                        ?since, until, user (and q, model) as for the list

Who sees what: with SDFC_AUTH, a user sees only the images they generated (someone else's image is a 404,
as a missing one); users in SDFC_ADMINS see everyone's and may filter with ?user=. A server without auth has
one local user, who sees everything. A non-admin's ?user= is ignored (as in the task list).

Every read is a request-path read (see `RecordStore.gate`): when the database is slow or down the answer is a
503 with Retry-After within the store's `request_timeout`, naming no host, user or driver error (those go to
the server log).
"""
from __future__ import annotations

import base64
import io
import logging
import re
from datetime import datetime, timedelta, timezone

from flask import Blueprint, Response, json, request

from ..api.auth import user_of
from .store import MAX_RECORD_ID, GalleryQuery, RecordStore, StoreUnavailable

log = logging.getLogger("sdfc.records")
MAX_PAGE_SIZE = 100
RECORD_ID = re.compile(r"[0-9]{1,20}")


class BadParameter(ValueError):
    pass


def _error(status: int, error: str, detail: str, headers: dict | None = None) -> Response:
    # The API's error shape ({error, detail, body, errors}), so clients parse one format.
    return Response(json.dumps({"error": error, "detail": detail, "body": "", "errors": detail},
                               ensure_ascii=False), status=status, mimetype="application/json", headers=headers)


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
        when = _as_utc(when)
    if end_of_day and len(raw) == 10:
        when = when + timedelta(days=1) if when.date() < datetime.max.date() else datetime.max
    return when


def _as_utc(when: datetime) -> datetime:
    """Naive UTC. A time whose UTC instant falls outside years 1..9999 (9999-12-31T23:00-12:00) is before or
    after every stored row: it becomes datetime.min or datetime.max, which filter the same."""
    try:
        return when.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:
        return datetime.max if when.utcoffset() < timedelta(0) else datetime.min


def _record_id(raw: str) -> int | None:
    """The id in an image URL; None when the path names no record that can exist (negative, not a number,
    beyond any id a table can hold)."""
    if not RECORD_ID.fullmatch(raw):
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_RECORD_ID else None


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
        "user": row.get("user"), "task_id": row.get("task_id"),
        "gpu_seconds": row.get("gpu_seconds"), "cost": row.get("cost"),
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


def make_gallery_blueprint(store: RecordStore, *, admins=(), auth_enabled: bool = True,
                           currency: str = "USD") -> Blueprint:
    """`admins`: users who see every user's records; `auth_enabled` False: the one local user sees all."""
    bp = Blueprint("gallery", __name__, url_prefix="/gallery/api")
    admins = frozenset(admins)

    def _own_only() -> str | None:
        """The caller when they may see only their own records; None for an admin or without auth."""
        caller = user_of()
        return None if not auth_enabled or caller in admins else caller

    def _scope() -> str | None:
        """The user filter of a list: the caller's own, or (an admin's) ?user=, or None for everyone's."""
        own = _own_only()
        return own if own is not None else request.args.get("user") or None

    def _visible(row: dict | None) -> dict | None:
        own = _own_only() if row is not None else None
        return row if own is None or row.get("user") == own else None  # someone else's: as if missing

    def _query(paged: bool = True) -> GalleryQuery:
        query = GalleryQuery(text=request.args.get("q") or None, model=request.args.get("model") or None,
                             since=_time_arg("since"), until=_time_arg("until", end_of_day=True), user=_scope())
        if paged:
            query.page = _int_arg("page", 1, 1, 10**6)
            query.page_size = _int_arg("page_size", 20, 1, MAX_PAGE_SIZE)
        return query

    @bp.errorhandler(BadParameter)
    def _bad(exc):
        return _error(400, "ValueError", str(exc))

    @bp.errorhandler(StoreUnavailable)
    def _unavailable(exc):
        # The cause (host, port, driver error) is for operators; the client learns only when to retry.
        log.warning("gallery %s %s: records database unavailable: %s", request.method, request.path, exc)
        retry_after = max(1, round(exc.retry_after or store.request_timeout))
        return _error(503, "StoreUnavailable", "the records database is not answering; try again shortly",
                      headers={"Retry-After": str(retry_after)})

    def _not_found(raw: str) -> Response:
        return _error(404, "NotFound", f"no image with id {raw[:40]}")

    @bp.get("/images")
    def list_images():
        query = _query()
        rows, total = store.query(query, request=True)
        return _json({"items": [_item(r) for r in rows], "page": query.page, "page_size": query.page_size,
                      "total": total, "pages": (total + query.page_size - 1) // query.page_size})

    # <raw>, not <int:…>: any segment reaches us, so a malformed id gets this API's 404, not Flask's.
    @bp.get("/images/<raw>")
    def one_image(raw: str):
        record_id, with_image = _record_id(raw), request.args.get("include") == "image"
        row = None if record_id is None else _visible(store.get(record_id, with_image=with_image, request=True))
        if row is None:
            return _not_found(raw)
        return _json(_item(row, detail=True))

    @bp.get("/images/<raw>/image.png")
    def download(raw: str):
        record_id = _record_id(raw)
        row = None if record_id is None else _visible(store.get(record_id, with_image=True, request=True))
        if row is None or not row.get("image_base64"):
            return _not_found(raw)
        data = png_with_infotext(base64.b64decode(row["image_base64"]), row.get("infotext"))
        name = f"sdfc-{record_id}-{row.get('seed') or 'image'}.png"
        return Response(data, mimetype="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @bp.get("/models")
    def models():
        return _json({"models": store.models(request=True, user=_scope())})

    @bp.get("/usage")
    def usage():
        result = store.usage(_query(paged=False), request=True)
        for group in [[result["total"]], *(result[k] for k in ("by_day", "by_model", "by_user"))]:
            for sums in group:  # float sums of rounded shares: rounded again to the shares' precision
                sums["gpu_seconds"], sums["cost"] = round(sums["gpu_seconds"], 4), round(sums["cost"], 8)
        return _json({**result, "currency": currency})

    return bp
