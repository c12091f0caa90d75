"""The durable spool: every record waits here, as a file, until the writer has stored it.

Written before the HTTP response leaves (write-ahead), removed after delivery, so a record survives a
database outage, a writer failure and a restart of this process: the dispatcher flushes leftovers at start.
Files are written atomically (temporary file, fsync, rename). A record the writer refuses for good is moved
to `rejected/` with the reason beside it, for an operator, instead of being retried forever or dropped.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

from ..files import atomic_write


class Spool:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.rejected_dir = self.root / "rejected"
        self._counter = itertools.count()

    def write(self, event: dict, image: bytes | None = None) -> str:
        """Store one pending event (and its image, when the outputs store could not take it); returns its name."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._counter):06d}"
        if image is not None:
            atomic_write(self.root / f"{name}.img", image)
        # The .json is written last: its presence means the entry is complete.
        body = json.dumps({"event": event, "has_image": image is not None}, ensure_ascii=True)
        atomic_write(self.root / f"{name}.json", body.encode("ascii"))
        return name

    def names(self) -> list[str]:
        """Pending entries, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if not p.name.startswith("."))

    def has(self, name: str) -> bool:
        return (self.root / f"{name}.json").exists()

    def load(self, name: str) -> tuple[dict, bytes | None]:
        entry = json.loads((self.root / f"{name}.json").read_text("ascii"))
        image = (self.root / f"{name}.img").read_bytes() if entry.get("has_image") else None
        return entry["event"], image

    def forget_image(self, name: str) -> None:
        """The image has reached the outputs store: keep only the event."""
        path = self.root / f"{name}.json"
        entry = json.loads(path.read_text("ascii"))
        entry["has_image"] = False
        atomic_write(path, json.dumps(entry, ensure_ascii=True).encode("ascii"))
        (self.root / f"{name}.img").unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        (self.root / f"{name}.json").unlink(missing_ok=True)
        (self.root / f"{name}.img").unlink(missing_ok=True)

    def reject(self, name: str, reason: str) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        (self.rejected_dir / f"{name}.reason.txt").write_text(reason + "\n", "utf-8")
        for suffix in (".img", ".json"):
            source = self.root / f"{name}{suffix}"
            if source.exists():
                os.replace(source, self.rejected_dir / source.name)

    def rejected(self) -> list[str]:
        if not self.rejected_dir.is_dir():
            return []
        return sorted(p.stem for p in self.rejected_dir.glob("*.json"))
