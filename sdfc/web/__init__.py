"""The web room: the generate page at `/` and the Images page at `/images`, plain HTML + CSS + JS modules.

No build step and no CDN: the files under `pages/` and `static/` are the shipped front end (package data, so
non-editable installs carry them). The pages hold no data of their own; their scripts talk to the public HTTP
API only (`/sdapi/v1/*` lists, the task API `/sdapi/v2/tasks`, `/internal/progress`, the gallery API), so a
page served by one instance follows a task that runs on another. Every route here, static files included,
goes through the app's Basic auth like any API route (the browser's own login prompt).
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

PAGES = Path(__file__).parent / "pages"
# Everything the pages load comes from this origin; inline scripts and styles are not used anywhere.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

bp = Blueprint("web", __name__, static_folder="static", static_url_path="/static/web")


def _page(name: str):
    response = send_from_directory(PAGES, name, mimetype="text/html")
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    return response


@bp.get("/")
def generate_page():
    return _page("generate.html")


@bp.get("/images")
def images_page():
    return _page("images.html")


@bp.after_request
def _headers(response):
    # Revalidate on every load (ETag / Last-Modified), so an upgraded server's pages show at once.
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response
