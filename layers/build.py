"""Build the FC layer zips of the CPU functions: `python/` at the zip's root (FC unpacks layers into /opt and
puts /opt/python on a built-in Python runtime's import path), holding the locked dependencies and sdfc.

    python layers/build.py                      # every layer, for FC's python3.10, into build/layers/
    python layers/build.py web --out /tmp/l     # one layer

Reproducible: exact versions and hashes from each layer's requirements.txt (deploy/lock.py), wheels only, no
bytecode, sorted entries with fixed timestamps and modes, so the same tree gives byte-identical zips.
Fails when a zip exceeds FC's code package limit. Publish with the command it prints.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# deploy/lock.py, loaded by path (a folder of scripts, not a package): the lock's target is the install's.
_spec = importlib.util.spec_from_file_location("sdfc_deploy_lock", ROOT / "deploy" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

RUNTIME = "python3.10"        # FC's built-in runtime of the web and records functions (s.yaml)
TARGET_PYTHON = "3.10"
TARGET_GLIBC = "2.28"         # python3.10 runs on Debian 10
LAYERS = ("web", "records")
ZIP_LIMIT = 500 * 1024 * 1024      # FC: code packages uploaded by tools or through OSS, as `layer publish` does
API_UPLOAD_LIMIT = 75 * 1024 * 1024  # FC: 100 MB once base64-encoded, for an upload through the API itself
ZIP_TIME = (1980, 1, 1, 0, 0, 0)   # the earliest time a zip can hold: no build clock in the archive


@dataclass
class Built:
    name: str
    path: Path
    files: int
    unpacked: int

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def sdfc_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return match.group(1) if match else "0.0.0"


def install_dependencies(requirements: Path, target: Path, python: str, glibc: str, hashes: bool) -> None:
    args = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--no-compile", "--target", str(target), *lock.target_args(python, glibc), "-r", str(requirements)]
    if hashes:
        args.insert(4, "--require-hashes")
    subprocess.run(args, check=True)
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts, with this machine's interpreter path
    for cache in list(target.rglob("__pycache__")):   # bytecode a wheel shipped: Python remakes what it needs
        shutil.rmtree(cache)


def copy_sdfc(target: Path) -> None:
    """The package itself (pure Python) and a minimal dist-info, so importlib.metadata knows its version."""
    shutil.copytree(ROOT / "sdfc", target / "sdfc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    version = sdfc_version()
    info = target / f"sdfc-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sdfc\nVersion: {version}\n")
    (info / "INSTALLER").write_text("sdfc layers/build.py\n")


def write_zip(tree: Path, out: Path) -> tuple[int, int]:
    """Zip `tree` so that equal trees give equal bytes; returns (files, unpacked bytes)."""
    files, unpacked = 0, 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for path in sorted(tree.rglob("*")):
            name = path.relative_to(tree).as_posix() + ("/" if path.is_dir() else "")
            info = zipfile.ZipInfo(name, ZIP_TIME)
            info.create_system = 3  # unix, so that the modes below are honoured
            executable = path.is_dir() or os.access(path, os.X_OK)
            info.external_attr = ((0o040755 if path.is_dir() else 0o100755 if executable else 0o100644) << 16)
            if path.is_dir():
                zf.writestr(info, b"")
                continue
            data = path.read_bytes()
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            files, unpacked = files + 1, unpacked + len(data)
    return files, unpacked


def build(name: str, out_dir: Path, python: str = TARGET_PYTHON, glibc: str = TARGET_GLIBC,
          hashes: bool = True) -> Built:
    """One layer zip, `out_dir/sdfc-<name>.zip`. `hashes=False` (versions still exact) lets a test build the
    same layer for another interpreter, whose wheels have other hashes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "layer"
        python_dir = tree / "python"
        install_dependencies(HERE / name / "requirements.txt", python_dir, python, glibc, hashes)
        copy_sdfc(python_dir)
        out = out_dir / f"sdfc-{name}.zip"
        files, unpacked = write_zip(tree, out)
    built = Built(name, out, files, unpacked)
    if built.size > ZIP_LIMIT:
        raise SystemExit(f"{out}: {built.size / 2**20:.1f} MiB is over FC's {ZIP_LIMIT // 2**20} MiB limit")
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layers", nargs="*", metavar="LAYER", help=f"default: all of {', '.join(LAYERS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "layers")
    args = parser.parse_args(argv)
    unknown = set(args.layers) - set(LAYERS)
    if unknown:
        parser.error(f"unknown layer(s) {', '.join(sorted(unknown))}; known: {', '.join(LAYERS)}")
    print(f"{'layer':<14}{'files':>7}{'unpacked MiB':>14}{'zip MiB':>9}  sha256")
    for name in args.layers or LAYERS:
        built = build(name, args.out)
        note = "  (over the API upload limit: publish through OSS, as `s` does)" \
            if built.size > API_UPLOAD_LIMIT else ""
        print(f"sdfc-{name:<9}{built.files:>7}{built.unpacked / 2**20:>14.1f}{built.size / 2**20:>9.1f}  "
              f"{built.sha256}{note}")
    print("\nPublish each one, then set its version in s.yaml (vars.webLayerVersion, vars.recordsLayerVersion):")
    for name in args.layers or LAYERS:
        print(f"  s cli fc3 layer publish --region $SDFC_REGION --layer-name sdfc-{name} "
              f"--code {args.out / f'sdfc-{name}.zip'} --compatible-runtime {RUNTIME} -a default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
