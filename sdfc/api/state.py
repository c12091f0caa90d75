"""What the API keeps between requests: the engine, options, the job queue and the running job.

Held in `app.extensions["sdfc"]`, built by the application factory: no import-time globals.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import Settings
from ..engine import Engine, JobControl
from .options import Options
from .queue import FifoLock

log = logging.getLogger("sdfc.api")


@dataclass
class RunningJob:
    name: str
    control: JobControl
    started: float = field(default_factory=time.time)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))


class ApiState:
    def __init__(self, settings: Settings, engine: Engine | None = None,
                 on_images: Callable[[list[dict]], None] | None = None):
        self.settings = settings
        self._engine = engine
        self._engine_lock = threading.Lock()
        self.options = Options()
        self.queue = FifoLock()
        self.job: RunningJob | None = None
        self.last_job_timestamp = ""
        # Called with one record per generated image (the records room plugs in here).
        self.on_images = on_images
        self.draining = False
        self.in_flight = 0
        self._in_flight_lock = threading.Condition()

    @property
    def engine(self) -> Engine:
        """Created on first use, so that the server listens before models are loaded (FC's initializer)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self.settings.models_dir, device=self.settings.device,
                                      default_model=self.settings.default_model)
                self.options.update(self.model_options())
            return self._engine

    @property
    def engine_ready(self) -> bool:
        return self._engine is not None

    def model_options(self) -> dict:
        info = self._engine.current
        return {"sd_model_checkpoint": info.title, "sd_checkpoint_hash": info.sha256}

    def start_job(self, name: str, control: JobControl) -> None:
        self.job = RunningJob(name, control)

    def end_job(self) -> None:
        if self.job:
            self.last_job_timestamp = self.job.timestamp
        self.job = None

    def track(self):
        """Context manager counting in-flight requests, for a pre-stop drain."""
        state = self

        class _Tracker:
            def __enter__(self):
                with state._in_flight_lock:
                    state.in_flight += 1

            def __exit__(self, *exc):
                with state._in_flight_lock:
                    state.in_flight -= 1
                    state._in_flight_lock.notify_all()
                return False

        return _Tracker()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._in_flight_lock:
            while self.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._in_flight_lock.wait(left)
        return True
