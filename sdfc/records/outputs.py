"""The outputs store: image files by key, in a folder (in FC a NAS or OSS mount shared by the functions).

Keys are relative paths like `2024/08/01/<request id>-0.png`. Images travel between functions by key, never
inside an event (FC's asynchronous bodies are capped at 128 KB).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..files import atomic_write

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}(/[A-Za-z0-9][A-Za-z0-9._-]{0,199}){0,7}")


class BadKey(ValueError):
    """A key that could escape the store's folder or is not one we write."""


class OutputsStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key) or ".." in key:
            raise BadKey(f"invalid outputs key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        """Write atomically (temporary file, fsync, rename): a reader sees the whole file or none."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()
