"""sd-api's entrypoint, the Dockerfile's CMD: `python -m functions.sdapi.main` serves the app (sdfc.fc.compose)
in this one process with sdfc.server, which drains on FC's SIGTERM.

Serving settings come from the environment: SDFC_PORT (9000, customContainerConfig's port), SDFC_THREADS (keep
it >= the function's instanceConcurrency in s.yaml, or FC would send requests that wait for a thread),
SDFC_HEADER_TIMEOUT_S, SDFC_BODY_TIMEOUT_S, SDFC_IDLE_TIMEOUT_S, SDFC_DRAIN_SECONDS (sdfc/server.py).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

def bind(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """0.0.0.0:$SDFC_PORT, where FC forwards (sdfc/fc/gateway.py)."""
    from sdfc.fc.gateway import container_bind

    return container_bind(os.environ if env is None else env)


def main() -> int:
    from sdfc.config import ConfigError, Settings
    from sdfc.fc.compose import create_sdapi_app
    from sdfc.server import ServerConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = bind()
    try:
        settings = Settings.from_env()
        settings.check_listen(host)  # no open API without strong SDFC_AUTH
        config = ServerConfig.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The server listens at once; models load in FC's POST /initialize (sdfc/fc/lifecycle.py).
    serve(create_sdapi_app(settings), host, port, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
