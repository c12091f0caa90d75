"""Records: every generation's prompt, parameters and image in `generated_images` (RDS MySQL in FC, SQLite
locally), written by the records writer and read by the gallery API.

Public surface (what `app.py`, `dispatch/` and the FC entrypoint use): stores, the outputs store, the
writer and the event helpers; the gallery blueprint is in `records.gallery` (it needs Flask, the
writer function does not).
"""
from .events import ImageNotReady, RecordRejected
from .outputs import OutputsStore
from .store import GalleryQuery, RecordStore, StoreUnavailable, open_store
from .writer import RecordWriter

__all__ = ["ImageNotReady", "RecordRejected", "OutputsStore", "GalleryQuery",
           "RecordStore", "StoreUnavailable", "open_store", "RecordWriter"]
