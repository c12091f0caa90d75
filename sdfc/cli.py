"""`sdfc` command line: serve, export, bench, train."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="sdfc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export", help="export models to ONNX, build the tiny test model", add_help=False)
    sub.add_parser("bench", help="benchmark sdfc against diffusers and optimum", add_help=False)
    sub.add_parser("train", help="train a LoRA on a folder of captioned images", add_help=False)
    if argv and argv[0] in ("export", "bench", "train"):
        # These need the build-time stack (torch); import them only when asked.
        if argv[0] == "train":
            from .training.cli import main as train_main
            return train_main(argv[1:])
        if argv[0] == "export":
            from models_export.cli import main as export_main
            return export_main(argv[1:])
        from bench.run import main as bench_main
        return bench_main(argv[1:])
    serve = sub.add_parser("serve", help="serve the A1111 API (and every local part) in one process")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--threads", type=int, default=None, help="request threads (default: SDFC_THREADS or 16)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2


def _serve(args) -> int:
    from .app import create_app
    from .config import ConfigError, Settings
    from .server import ServerConfig, serve

    try:
        settings = Settings.from_env()
        settings.check_listen(args.host)
        config = ServerConfig.from_env(threads=args.threads)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(create_app(settings), args.host, args.port, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
