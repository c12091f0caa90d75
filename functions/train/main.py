"""The training function's entrypoint, the Dockerfile's CMD: `python -m functions.train.main` serves FC's async
invocations of train tasks (sdfc/training/function.py) on 0.0.0.0:$SDFC_PORT."""
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
