"""Serve an app with gunicorn: one worker (one engine, one GPU), a few threads so that progress,
options and list routes answer while a generation runs."""
from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication

log = logging.getLogger("sdfc.server")


class _Gunicorn(BaseApplication):
    def __init__(self, app, options: dict):
        self._app, self._options = app, options
        super().__init__()

    def load_config(self):
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        return self._app

    @staticmethod
    def settings_names() -> set[str]:
        from gunicorn.config import KNOWN_SETTINGS
        return {s.name for s in KNOWN_SETTINGS}


def serve(app, host: str, port: int, threads: int = 4, timeout: int = 0) -> None:
    options = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": timeout,  # generations are long; FC enforces the function's own timeout
        "accesslog": None,   # the app writes one structured line per request itself
        "loglevel": "info",
    }
    if "control_socket_disable" in _Gunicorn.settings_names():
        # gunicorn >= 24 opens a management socket in $HOME; several servers on one host would share it.
        options["control_socket_disable"] = True
    log.info("sdfc listening on http://%s:%d", host, port)
    _Gunicorn(app, options).run()
