"""The durable spool: every record waits here, as a file, until the writer has stored it.

Written before the HTTP response leaves (write-ahead), removed after delivery, so a record survives a
database outage, a writer failure and a restart of this process: the dispatcher flushes leftovers at start.
Files are written atomically (temporary file, fsync, rename). A record the writer refuses for good is moved
to `rejected/` with the reason beside it, for an operator, instead of being retried forever or dropped.

Shared by several instances (FC: a NAS folder, so that a recycled instance's records are not lost with its
disk), each instance writes and delivers only its own folder `instances/<id>/`, so that no instance's drain
waits for another's records; entries left in another instance's folder for `orphan_age_s` (its instance was
recycled before delivering them) are adopted: moved into this instance's folder by an atomic rename, which
only one adopter can win, then delivered. The writer's upsert makes a rare double delivery harmless.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import time
from pathlib import Path

from ..files import atomic_write


INSTANCES = "instances"
# Longer than a request, its records' first delivery attempts and a pre-stop drain take (FC: at most 90 s
# of pre-stop), so that a live instance's fresh entries are never taken from it.
ORPHAN_AGE_S = 600.0


class Spool:
    def __init__(self, root: str | os.PathLike, instance: str | None = None, orphan_age_s: float = ORPHAN_AGE_S):
        self.shared_root = Path(root)
        self.instance = _folder_name(instance) if instance else None
        self.root = self.shared_root / INSTANCES / self.instance if self.instance else self.shared_root
        self.rejected_dir = self.shared_root / "rejected"
        self.orphan_age_s = orphan_age_s
        self._counter = itertools.count()

    def adopt_orphans(self) -> int:
        """Move entries other instances left (older than orphan_age_s) into this instance's folder; how many."""
        if self.instance is None:
            return 0
        folders = [self.shared_root]  # entries written before the spool was shared
        instances = self.shared_root / INSTANCES
        if instances.is_dir():
            folders += [p for p in instances.iterdir() if p.is_dir() and p.name != self.instance]
        cutoff, adopted = time.time() - self.orphan_age_s, 0
        for folder in folders:
            for entry in list(folder.glob("*.json")):
                try:
                    if entry.name.startswith(".") or entry.stat().st_mtime > cutoff:
                        continue
                    self.root.mkdir(parents=True, exist_ok=True)
                    image = entry.with_suffix(".img")
                    if image.exists():  # the image first: the .json's presence means the entry is complete
                        os.replace(image, self.root / image.name)
                    os.replace(entry, self.root / entry.name)  # the claim: one adopter wins, others miss it
                except FileNotFoundError:
                    continue  # another instance adopted it first
                os.utime(self.root / entry.name)  # fresh again: not taken on by a third instance at once
                adopted += 1
            if folder != self.shared_root:
                try:
                    folder.rmdir()  # empty now: a recycled instance's folder
                except OSError:
                    pass
        return adopted

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


def _folder_name(instance: str) -> str:
    """An instance id as one safe path component (FC's ids are letters, digits and dashes)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", instance).strip(".")[:128]
    return name or "instance"
