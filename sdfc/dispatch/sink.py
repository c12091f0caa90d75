"""The API's `on_images` hook: image bytes to the outputs store, metadata + key to the dispatcher.

Runs in the request thread after the response is built, so it must be quick and must never raise into the
response: any failure is logged and the record still reaches the spool (the image inside it if the outputs
store refused it).
"""
from __future__ import annotations

import logging

from ..records.events import event_from_generation, image_key, utc_now
from ..records.outputs import OutputsStore
from .dispatcher import Dispatcher

log = logging.getLogger("sdfc.dispatch")


class RecordSink:
    def __init__(self, outputs: OutputsStore, dispatcher: Dispatcher):
        self.outputs, self.dispatcher = outputs, dispatcher

    def __call__(self, records: list[dict]) -> None:
        for record in records:
            try:
                self._one(record)
            except Exception:  # noqa: BLE001 - the user's request must not fail because of its record
                log.exception("record %s/%s could not be queued", record.get("request_id"),
                              record.get("image_index"))

    def _one(self, record: dict) -> None:
        now = utc_now()
        key = image_key(record["request_id"], record["image_index"], record.get("image_format", "png"), now)
        event = event_from_generation(record, key, now)
        image = None
        try:
            self.outputs.put(key, record["image_bytes"])
        except OSError as exc:
            log.warning("outputs store refused %s (%s); the image waits in the spool", key, exc)
            image = record["image_bytes"]
        self.dispatcher.submit(event, image)
