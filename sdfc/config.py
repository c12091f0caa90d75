"""Configuration from the environment (FC passes function configuration as environment variables)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODELS_DIR = REPO_ROOT / "tests" / "fixtures" / "models"


class ConfigError(ValueError):
    """Configuration that must stop the server from starting; the message says what to change."""


def parse_auth(value: str | None) -> dict[str, str]:
    """`user:pass[,user2:pass2]` → {user: pass}. Passwords may contain ':' (split at the first one)."""
    users: dict[str, str] = {}
    for entry in (value or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"SDFC_AUTH entry {user or entry!r} must look like user:password")
        users[user] = password
    return users


def password_problem(password: str) -> str | None:
    """The original service's policy: 8–30 characters, at least three of upper, lower, digit, symbol."""
    if not 8 <= len(password) <= 30:
        return "must be 8 to 30 characters long"
    classes = [r"[A-Z]", r"[a-z]", r"[0-9]", r"[^A-Za-z0-9]"]
    if sum(bool(re.search(c, password)) for c in classes) < 3:
        return "must mix at least three of: upper case, lower case, digits, symbols"
    return None


def _int(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


@dataclass
class Settings:
    auth: dict[str, str] = field(default_factory=dict)
    models_dir: Path = TINY_MODELS_DIR
    outputs_dir: Path = Path("data/outputs")
    database_url: str = "sqlite:///data/sdfc.db"
    dispatch: str = "local"
    device: str = "cpu"
    default_model: str | None = None
    styles_file: Path | None = None
    cors_origins: tuple[str, ...] = ()
    docs_open: bool = True
    # Limits: a request beyond one gets a 4xx naming it. FC caps synchronous bodies at 32 MB.
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_images: int = 16
    max_body_bytes: int = 32 * 1024 * 1024
    max_prompt_chars: int = 200_000

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("SDFC_DATA_DIR", "data"))
        return cls(
            auth=parse_auth(env.get("SDFC_AUTH")),
            models_dir=Path(env.get("SDFC_MODELS_DIR") or TINY_MODELS_DIR),
            outputs_dir=Path(env.get("SDFC_OUTPUTS_DIR") or data_dir / "outputs"),
            database_url=env.get("SDFC_DATABASE_URL") or f"sqlite:///{data_dir / 'sdfc.db'}",
            dispatch=env.get("SDFC_DISPATCH", "local"),
            device=env.get("SDFC_DEVICE", "cpu"),
            default_model=env.get("SDFC_DEFAULT_MODEL") or None,
            styles_file=Path(env["SDFC_STYLES_FILE"]) if env.get("SDFC_STYLES_FILE") else None,
            cors_origins=tuple(o.strip().rstrip("/") for o in env.get("SDFC_CORS_ORIGINS", "").split(",")
                               if o.strip()),
            docs_open=env.get("SDFC_DOCS_AUTH", "0") not in ("1", "true", "yes"),
            max_pixels=_int(env, "SDFC_MAX_PIXELS", cls.max_pixels),
            max_steps=_int(env, "SDFC_MAX_STEPS", cls.max_steps),
            max_images=_int(env, "SDFC_MAX_IMAGES", cls.max_images),
            max_body_bytes=_int(env, "SDFC_MAX_BODY_BYTES", cls.max_body_bytes),
        )

    def check_listen(self, host: str) -> None:
        """Refuse to serve beyond loopback without credentials, and anywhere with weak ones."""
        loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
        if not loopback and not self.auth:
            raise ConfigError(f"refusing to listen on {host} without SDFC_AUTH (set user:password)")
        for user, password in self.auth.items():
            problem = password_problem(password)
            if problem:
                raise ConfigError(f"the password of user {user!r} {problem}")
