"""The training function's entrypoint, the Dockerfile's CMD: `python -m functions.train.main` serves FC's async
invocations of train tasks (sdfc/training/function.py) on 0.0.0.0:$SDFC_PORT."""
from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

# FC forwards to the port in customContainerConfig; 127.0.0.1 would give FunctionNotStarted.
HOST = "0.0.0.0"
DEFAULT_PORT = 9000


def bind(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    env = os.environ if env is None else env
    return HOST, int(env.get("SDFC_PORT") or DEFAULT_PORT)


def main() -> int:
    from sdfc.config import ConfigError, Settings
    from sdfc.training.function import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = bind()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(host, port, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
