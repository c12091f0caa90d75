"""FC's built-in Python runtime entrypoints for the records function (functions/records/index.py imports
these): `initialize(context)` once per instance, `handler(event, context)` per invocation, `pre_stop`.

The writer (and so its database connections) lives at module scope, reused by every invocation the
instance serves. An exception marks the invocation failed, so FC retries it (`maxAsyncRetryAttempts`) and
then hands it to the `onFailure` destination: a record is never dropped silently, even a refused one.
"""
from __future__ import annotations

import json
import logging
import threading

from ..config import Settings
from .outputs import OutputsStore
from .store import open_store
from .writer import RecordWriter

log = logging.getLogger("sdfc.records")
_writer: RecordWriter | None = None
_lock = threading.Lock()


def writer() -> RecordWriter:
    global _writer
    with _lock:
        if _writer is None:
            settings = Settings.from_env()
            _writer = RecordWriter(open_store(settings.database_url), OutputsStore(settings.outputs_dir))
        return _writer


def initialize(context=None) -> None:
    """Connect (and create the table) before the first event; a failure here is retried by the first event."""
    try:
        writer().store.count()
    except Exception as exc:  # noqa: BLE001 - the database may be back by the first invocation
        log.warning("records store not ready at initialize: %s", exc)


def handler(event, context=None) -> str:
    request_id = getattr(context, "request_id", None)
    try:
        result = writer().handle(event)
    except Exception as exc:
        log.error(json.dumps({"fc_request_id": request_id, "error": type(exc).__name__, "detail": str(exc)}))
        raise
    log.info(json.dumps({"fc_request_id": request_id, **result}))
    return json.dumps(result)


def pre_stop(context=None) -> None:
    if _writer is not None:
        _writer.store.close()
