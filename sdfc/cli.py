"""`sdfc` command line: serve, export, bench."""
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
    if argv and argv[0] in ("export", "bench"):
        # These need the build-time stack (torch); import them only when asked.
        if argv[0] == "export":
            from models_export.cli import main as export_main
            return export_main(argv[1:])
        from bench.run import main as bench_main
        return bench_main(argv[1:])
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
