"""What the API keeps between requests: the engine, options, the job queue and the running job.

Held in `app.extensions["sdfc"]`, built by the application factory: no import-time globals.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..config import Settings
from ..engine import Engine, JobControl
from .errors import ApiError, a1111_error
from .options import Options
from .queue import FifoLock

log = logging.getLogger("sdfc.api")

# How long a shutdown may wait for work in progress (SIGTERM in sdfc/server.py, FC's GET /pre-stop): under FC's
# 90 s PreStop limit, with room for the records dispatcher's own drain.
DRAIN_ENV = "SDFC_DRAIN_SECONDS"
DEFAULT_DRAIN_S = 80.0
# What a refused client is told to wait: another instance (FC) or the restarted server (locally) takes it.
RETRY_AFTER_S = 5


# app.extensions key: set by the server (sdfc/server.py) to a callable telling whether every answer but the
# caller's own has been sent; FC's /pre-stop waits for it before the instance may go.
ANSWERS_SENT = "sdfc.answers_sent"


def drain_seconds(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    return float(env.get(DRAIN_ENV) or DEFAULT_DRAIN_S)


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
        if engine is not None:
            self.options.watch("sd_checkpoint_cache", engine.set_checkpoint_cache)
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
                                      default_model=self.settings.default_model,
                                      embeddings_dir=self.settings.embeddings_dir,
                                      lora_dir=self.settings.lora_dir,
                                      model_memory_bytes=self.settings.model_memory_bytes,
                                      cuda=self.settings.cuda)
                # POST /options' sd_checkpoint_cache bounds the engine's model cache from now on.
                self.options.watch("sd_checkpoint_cache", self._engine.set_checkpoint_cache)
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

    def admit(self) -> None:
        """Let a generation request wait for the engine, or refuse it (503) when SDFC_MAX_QUEUED_JOBS already
        run or wait: a queue that held every request thread would leave none for progress or options."""
        limit = self.settings.max_queued_jobs
        if self.queue.waiting >= limit:
            raise ApiError(503, f"{limit} generation(s) are already running or waiting on this instance "
                                "(SDFC_MAX_QUEUED_JOBS); send it again shortly, or use the task API",
                           error="ServiceUnavailable", headers={"Retry-After": str(RETRY_AFTER_S)})

    def refusal(self):
        """The answer to a new request while draining (503 + Retry-After, A1111's shape), else None."""
        if not self.draining:
            return None
        return a1111_error(503, "ServiceUnavailable", "the server is shutting down; send the request again",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def drain(self, timeout: float, grace: float = 0.0) -> bool:
        """Refuse new work and let the requests in flight (the running job and those queued behind it) finish
        within `timeout` seconds. Past it, fail cleanly: queued jobs get 503, the running one is interrupted
        (its client gets the image so far, as with A1111's interrupt), and `grace` more seconds are given for
        those answers. True when everything finished in time."""
        self.draining = True
        if self.wait_idle(timeout):
            return True
        log.warning("drain: %d request(s) still in flight after %.1f s; interrupting", self.in_flight, timeout)
        self.queue.close()
        job = self.job
        if job is not None:
            job.control.interrupt()
        self.wait_idle(grace)
        return False

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._in_flight_lock:
            while self.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._in_flight_lock.wait(left)
        return True
