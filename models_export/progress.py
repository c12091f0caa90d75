"""Progress lines for long export steps: what started, and how long it took."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("sdfc.export")


@contextmanager
def step(what: str) -> Iterator[None]:
    """Log `what` when it starts and again, with the elapsed time, when it ends."""
    started = time.monotonic()
    log.info("%s ...", what)
    yield
    log.info("%s: done in %.1f s", what, time.monotonic() - started)
