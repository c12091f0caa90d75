"""The records writer: one event in, one row upserted. The same code runs in FC's records function and,
locally, in-process behind the dispatcher.

Idempotent: the row is keyed by (request_id, image_index), so a redelivered event (FC's async retries, the
dispatcher's) updates the row it already wrote instead of adding one. `request_id` is the generation's own
record key, drawn by the server for each generation (sdfc/api/generation.py): no two generations share one,
whatever ids their requests carried, so an upsert never replaces another generation's row.
"""
from __future__ import annotations

import hashlib
import logging

from .events import ImageNotReady, RecordRejected, add_image, decode_event, row_from_event
from .outputs import BadKey, OutputsStore
from .store import RecordStore

log = logging.getLogger("sdfc.records")


class RecordWriter:
    def __init__(self, store: RecordStore, outputs: OutputsStore):
        self.store, self.outputs = store, outputs

    def _image(self, event: dict) -> bytes:
        key = event.get("image_key")
        try:
            data = self.outputs.get(key)
        except BadKey as exc:
            raise RecordRejected(str(exc)) from None
        except FileNotFoundError:
            raise ImageNotReady(f"image {key!r} not found in the outputs store {self.outputs.root}") from None
        expected = event.get("image_sha256")
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise ImageNotReady(f"image {key!r} does not match the event's sha256 (still being replaced?)")
        return data

    def handle(self, body) -> dict:
        """Store one event (bytes, str or dict); returns {id, request_id, image_index}.

        Raises RecordRejected when the event can never be stored, other errors when a retry may succeed.
        """
        event = decode_event(body, self.outputs)
        row = add_image(row_from_event(event), self._image(event))
        record_id = self.store.upsert(row)
        log.info("stored record %s/%s as id %s", row["request_id"], row["image_index"], record_id)
        return {"id": record_id, "request_id": row["request_id"], "image_index": row["image_index"]}
