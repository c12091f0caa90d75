"""HTTP Basic auth on every protected route, as A1111's --api-auth but also covering loras and pages."""
from __future__ import annotations

import base64
import binascii
import hmac

from flask import g, request

from .errors import a1111_error

CHALLENGE = {"WWW-Authenticate": 'Basic realm="sdfc", charset="UTF-8"'}


def public(view):
    """Mark a view as answered without credentials."""
    view.sdfc_public = True
    return view


def is_public(app, endpoint: str | None) -> bool:
    return bool(getattr(app.view_functions.get(endpoint), "sdfc_public", False))


def platform_hook(control_path: str):
    """Mark a view as a hook of the platform (FC's `/initialize`, `/pre-stop`, `/invoke`): in FC it answers
    only FC's own call of that hook (see sdfc/fc/gateway.py), elsewhere only a client with credentials."""
    def mark(view):
        view.sdfc_platform_hook = control_path
        return view
    return mark


def platform_hook_of(app, endpoint: str | None) -> str | None:
    return getattr(app.view_functions.get(endpoint), "sdfc_platform_hook", None)


def credentials_from_header(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def check(users: dict[str, str]):
    """None when the request may pass, else A1111's 401 (with a challenge, unlike A1111)."""
    if not users:
        return None
    creds = credentials_from_header(request.headers.get("Authorization"))
    if creds is None:
        return a1111_error(401, "HTTPException", "Not authenticated", headers=CHALLENGE)
    user, password = creds
    # Compare against every user in constant time so that timing reveals neither names nor passwords.
    ok = False
    for known_user, known_password in users.items():
        same_user = hmac.compare_digest(user.encode(), known_user.encode())
        same_password = hmac.compare_digest(password.encode(), known_password.encode())
        ok |= same_user and same_password
    if not ok:
        return a1111_error(401, "HTTPException", "Incorrect username or password", headers=CHALLENGE)
    g.user = user
    return None


def user_of() -> str:
    """The user this request authenticated as; "" on a server without SDFC_AUTH (one local user)."""
    return g.get("user", "")
