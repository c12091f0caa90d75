"""Pin a requirements.in to exact versions and sha256 hashes for one target interpreter and platform.

    python deploy/lock.py functions/sdapi/requirements-cuda13.in --python 3.12 --glibc 2.39
    python deploy/lock.py functions/sdapi/requirements-cuda12.in --python 3.12 --glibc 2.39
    python deploy/lock.py layers/web/requirements.in --python 3.10 --glibc 2.28

pip resolves for the target (not for this machine) from wheels only, and reports what it chose; the lock
lists each distribution with the hash of that wheel, so `pip install --require-hashes` on the target installs
exactly those files. Resolution needs the package index; installing from the lock needs nothing else.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def manylinux_platforms(glibc: str, arch: str = "x86_64") -> list[str]:
    """Every manylinux tag a system with this glibc accepts, most specific first (pip 23 does not expand
    `manylinux_2_X` by itself, so the whole list is passed)."""
    major, minor = (int(p) for p in glibc.split("."))
    if major != 2 or minor < 17:
        raise ValueError(f"glibc {glibc}: only 2.17 and newer are supported")
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}", f"manylinux_2_12_{arch}", f"manylinux2010_{arch}",
                   f"manylinux_2_5_{arch}", f"manylinux1_{arch}"]


def target_args(python: str, glibc: str) -> list[str]:
    """pip options that make it resolve and install for the target instead of this interpreter."""
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    for tag in manylinux_platforms(glibc):
        args += ["--platform", tag]
    return args


def resolve(requirements: Path, python: str, glibc: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                        "--disable-pip-version-check", "--target", str(Path(tmp) / "target"),
                        "--report", str(report), *target_args(python, glibc), "-r", str(requirements)],
                       check=True)
        return json.loads(report.read_text())["install"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def omitted_names(requirements: Path) -> set[str]:
    """`# lock-omit: NAME` lines: a dependency the code never imports (installed with --no-deps, it is safe
    to leave out, and with it whatever only it needed). Read in the file and in those it includes (`-r FILE`,
    relative to it, as pip reads them)."""
    text = requirements.read_text()
    found = {_norm(n) for n in re.findall(r"^#\s*lock-omit:\s*([A-Za-z0-9._-]+)", text, re.MULTILINE)}
    for included in re.findall(r"^-r\s+(\S+)", text, re.MULTILINE):
        found |= omitted_names(requirements.parent / included)
    return found


def keep_reachable(items: list[dict], omit: set[str]) -> list[dict]:
    """The requested distributions and what they need, not walking through omitted ones."""
    by_name = {_norm(i["metadata"]["name"]): i for i in items}
    edges = {name: {_norm(re.split(r"[ ;<>=!~\[(]", dep, maxsplit=1)[0])
                    for dep in item["metadata"].get("requires_dist") or []} & by_name.keys()
             for name, item in by_name.items()}
    todo = [n for n, i in by_name.items() if i.get("requested") and n not in omit]
    kept: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in kept:
            kept.add(name)
            todo.extend(edges[name] - omit)
    return [by_name[n] for n in kept]


def lock_lines(items: list[dict]) -> list[str]:
    lines = []
    for item in sorted(items, key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise SystemExit(f"{name} {version}: pip reported no sha256 hash")
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{hashes['sha256']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("requirements", type=Path, help="a requirements.in (names with optional pins)")
    parser.add_argument("--python", required=True, help="target Python version, e.g. 3.10")
    parser.add_argument("--glibc", required=True, help="target glibc version, e.g. 2.28")
    parser.add_argument("-o", "--output", type=Path, help="default: requirements.txt beside the input")
    args = parser.parse_args(argv)
    output = args.output or args.requirements.with_suffix(".txt")
    header = (f"# Locked from {args.requirements.name} for CPython {args.python}, glibc {args.glibc} (x86_64) by\n"
              f"# deploy/lock.py: install with pip --require-hashes --no-deps. Do not edit: re-run the lock.\n")
    items = keep_reachable(resolve(args.requirements, args.python, args.glibc), omitted_names(args.requirements))
    output.write_text(header + "\n".join(lock_lines(items)) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
