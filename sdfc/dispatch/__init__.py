"""Dispatch: carries each generation's record from the API (its `on_images` hook) to the records writer.

It connects `api/` and `records/` through their public surfaces only: the API hands over plain record dicts,
the writer takes encoded events. `SDFC_DISPATCH` picks the transport: `local` (in-process writer), `fc3`
(FC 3.0 InvokeFunction, async), `fc2` (FC 2.0 service + function, async, aliyun-fc2) or `fc2-open` (the same
through FC 2.0's OpenAPI SDK, alibabacloud-fc-open20210406).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

from ..config import ConfigError, Settings
from ..records.outputs import OutputsStore
from .credentials import CredentialSource
from .dispatcher import Dispatcher
from .sink import RecordSink
from .spool import Spool
from .transports import Fc2OpenTransport, Fc2Transport, Fc3Transport, LocalTransport

log = logging.getLogger("sdfc.dispatch")
__all__ = ["RecordPipeline", "build_pipeline", "Dispatcher", "RecordSink", "Spool", "CredentialSource"]


@dataclass
class RecordPipeline:
    sink: RecordSink
    dispatcher: Dispatcher
    credentials: CredentialSource

    def start(self) -> None:
        """Start the worker in this process (flushing what a previous one left in the spool).

        Called before every request: it must never fail one."""
        try:
            self.dispatcher.start()
        except Exception:  # noqa: BLE001
            log.exception("records dispatcher could not start; records wait in the spool")

    def remember_credentials(self, headers: Mapping[str, str]) -> None:
        """Take FC's role credentials from a request's `x-fc-access-key-*` headers. The caller decides that
        the headers are FC's: only for an authenticated request in FC (sdfc/app.py)."""
        self.credentials.remember(headers)

    def close(self, timeout: float | None = None) -> bool:
        return self.dispatcher.close(timeout)


def fc_endpoint(settings: Settings) -> str:
    if settings.fc_endpoint:
        return settings.fc_endpoint
    if settings.fc_account_id and settings.fc_region:
        return f"https://{settings.fc_account_id}.{settings.fc_region}.fc.aliyuncs.com"
    raise ConfigError(f"SDFC_DISPATCH={settings.dispatch} needs SDFC_FC_ENDPOINT, or FC_ACCOUNT_ID and FC_REGION "
                      "(FC sets both in a function)")


def build_transport(settings: Settings, credentials: CredentialSource,
                    local_handler: Callable[[bytes], object] | None = None):
    if settings.dispatch == "local":
        if local_handler is None:
            raise ConfigError("SDFC_DISPATCH=local needs this process's records writer")
        return LocalTransport(local_handler)
    if settings.dispatch == "fc3":
        return Fc3Transport(settings.records_function, fc_endpoint(settings), credentials,
                            qualifier=settings.records_qualifier, max_event_bytes=settings.fc_async_body_limit)
    if settings.dispatch == "fc2":
        return Fc2Transport(settings.records_service, settings.records_function, fc_endpoint(settings),
                            credentials, qualifier=settings.records_qualifier,
                            max_event_bytes=settings.fc_async_body_limit)
    if settings.dispatch == "fc2-open":
        return Fc2OpenTransport(settings.records_service, settings.records_function, fc_endpoint(settings),
                                credentials, qualifier=settings.records_qualifier,
                                max_event_bytes=settings.fc_async_body_limit)
    raise ConfigError(f"SDFC_DISPATCH must be local, fc3, fc2, fc2-open or off, got {settings.dispatch!r}")


def build_pipeline(settings: Settings, outputs: OutputsStore,
                   local_handler: Callable[[bytes], object] | None = None) -> RecordPipeline:
    credentials = CredentialSource()
    # In FC the spool is on the NAS (SDFC_SPOOL_DIR), shared by every instance: each writes its own folder and
    # adopts what a recycled one left behind.
    spool = Spool(settings.spool_dir, instance=settings.fc_instance_id if settings.in_fc else None)
    dispatcher = Dispatcher(spool, build_transport(settings, credentials, local_handler),
                            outputs, queue_size=settings.dispatch_queue_size,
                            max_backoff_s=settings.dispatch_max_backoff_s,
                            drain_timeout_s=settings.dispatch_drain_s)
    return RecordPipeline(RecordSink(outputs, dispatcher), dispatcher, credentials)
