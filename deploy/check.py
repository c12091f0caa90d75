"""Check s.yaml offline: render it with Serverless Devs (`s preview`) and validate what `s deploy` would send.

    python deploy/check.py            # with your environment (SDFC_AUTH, SDFC_IMAGE, ...)

`s verify` and `s plan` need the fc3 component, which only downloads from the Serverless Devs registry, and
fc3's own schema rejects today's GPU types; so the rendered props are validated here against the schemas
in this folder, plus the rules a schema cannot say: secrets only through `${env('NAME')}` without a default,
environment under FC's 4 KB, vCPU steps and ratios, roles and routes that point at functions that exist.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
S_YAML = ROOT / "s.yaml"
S_BIN = DEPLOY / "node_modules" / ".bin" / "s"
SCHEMAS = {"fc3": DEPLOY / "fc3-props.schema.json", "fc3-domain": DEPLOY / "fc3-domain-props.schema.json"}
# Needed by every deploy and deliberately without a default: secrets and account-specific identifiers.
REQUIRED_ENV = ("SDFC_AUTH", "SDFC_DATABASE_URL", "SDFC_IMAGE", "SDFC_TRAIN_IMAGE", "SDFC_VPC_ID",
                "SDFC_VSWITCH_ID", "SDFC_SECURITY_GROUP_ID", "SDFC_NAS_MOUNT_TARGET")
SECRET_ENV = ("SDFC_AUTH", "SDFC_DATABASE_URL")
SECRET_NAME = re.compile(r"AUTH|PASSW|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|DATABASE_URL|CREDENTIAL", re.I)
# Values that are credentials whatever their key: a URL with a password, Basic auth, an AccessKey ID, a key.
SECRET_VALUE = re.compile(r"://[^/\s:@]+:[^@/\s]+@|^Basic\s|LTAI[0-9A-Za-z]{12,}|-----BEGIN [A-Z ]*PRIVATE KEY")
ENV_CALL = re.compile(r"\$\{\s*env\(\s*['\"]([^'\"]+)['\"]\s*(?:,\s*['\"]([^'\"]*)['\"]\s*)?\)\s*\}")
ENV_LIMIT = 4096  # FC: all of a function's environment variables together


class RenderError(RuntimeError):
    """`s preview` refused the file (an undefined variable, a missing environment variable)."""


def s_home(base: Path, account_id: str | None = None) -> Path:
    """A HOME for `s` with analytics off and, when given, a dummy access so `${config('AccountID')}` renders."""
    home = base / "s-home"
    if (home / ".s").is_dir():
        return home
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home))
    _run_s(["set", "analysis", "disable"], env)
    if account_id:
        _run_s(["config", "add", "-a", "default", "--AccessKeyID", "placeholder", "--AccessKeySecret",
                "placeholder", "--AccountID", account_id, "-f"], env)
    return home


def _run_s(args: list[str], env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if not S_BIN.exists():
        raise FileNotFoundError(f"{S_BIN} is missing: run `npm ci --prefix deploy` (Serverless Devs CLI)")
    return subprocess.run([str(S_BIN), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def render(env: dict, home: Path, template: Path = S_YAML) -> dict:
    """The whole file as `s deploy` would see it: vars, env() and resource references resolved."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SDFC_")}
    full.update(env, HOME=str(home))
    done = _run_s(["preview", "-t", str(template), "-o", "json", "--silent"], full, cwd=template.parent)
    if done.returncode != 0:
        raise RenderError((done.stdout + done.stderr).strip())
    return json.loads(done.stdout)


def env_uses(text: str) -> list[tuple[str, str | None]]:
    """Every `${env('NAME'[, 'default'])}` in the file: (name, default or None)."""
    return [(m.group(1), m.group(2)) for m in ENV_CALL.finditer(text)]


def env_problems(text: str, required=REQUIRED_ENV) -> list[str]:
    uses = env_uses(text)
    problems = [f"${{env('{name}')}} has a default; a required variable must stop the deploy when unset"
                for name, default in uses if name in required and default is not None]
    problems += [f"{name} is required but s.yaml never reads it" for name in required
                 if name not in {n for n, _ in uses}]
    return problems


def _strings(value, path="props"):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def secret_problems(rendered: dict, env: dict) -> list[str]:
    """A credential in the rendered file that is not one of the environment's values was written in s.yaml."""
    from_env = {v for k, v in env.items() if v}
    problems = []
    for name, resource in rendered.get("resources", {}).items():
        for key, value in (resource.get("props", {}).get("environmentVariables") or {}).items():
            if SECRET_NAME.search(key) and value not in from_env:
                problems.append(f"{name}: environment variable {key} is hard-coded; use ${{env('{key}')}}")
        for path, value in _strings(resource.get("props", {})):
            if SECRET_VALUE.search(value) and value not in from_env:
                problems.append(f"{name}: {path} holds a credential written in s.yaml; use ${{env('...')}}")
    return problems


def _schema_errors(schema_path: Path, props: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(schema_path.read_text()))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(props)'}: {e.message}"
            for e in sorted(validator.iter_errors(props), key=lambda e: list(e.absolute_path))]


def _function_rules(props: dict) -> list[str]:
    problems = []
    cpu, memory = props.get("cpu"), props.get("memorySize")
    if cpu is not None and abs(cpu * 20 - round(cpu * 20)) > 1e-9:
        problems.append(f"cpu {cpu} is not a multiple of 0.05")
    if cpu and memory and "gpuConfig" not in props and not cpu <= memory / 1024 <= 4 * cpu:
        problems.append(f"cpu {cpu} and memorySize {memory}: FC wants 1 to 4 GB per vCPU")
    env_bytes = sum(len(k) + len(str(v)) for k, v in (props.get("environmentVariables") or {}).items())
    if env_bytes > ENV_LIMIT:
        problems.append(f"environment variables take {env_bytes} bytes, over FC's {ENV_LIMIT}")
    return problems


def validate(rendered: dict) -> list[str]:
    """Schema and cross-resource problems of a rendered s.yaml; empty when it is deployable as far as an
    offline check can tell."""
    problems = []
    resources = rendered.get("resources", {})
    functions = {r["props"].get("functionName") for r in resources.values() if r.get("component") == "fc3"}
    for name, resource in resources.items():
        component, props = resource.get("component"), resource.get("props", {})
        if component not in SCHEMAS:
            problems.append(f"{name}: no schema for component {component!r}")
            continue
        problems += [f"{name}: {p}" for p in _schema_errors(SCHEMAS[component], props)]
        if component == "fc3":
            problems += [f"{name}: {p}" for p in _function_rules(props)]
        else:
            for route in props.get("routeConfig", {}).get("routes", []):
                if route.get("functionName") not in functions:
                    problems.append(f"{name}: route {route.get('path')} points at unknown function "
                                    f"{route.get('functionName')!r}")
    return problems


def main() -> int:
    text = S_YAML.read_text()
    problems = env_problems(text)
    try:  # your own HOME: its ~/.s access fills ${config('AccountID')}
        rendered = render(dict(os.environ), Path.home())
    except RenderError as exc:
        print(f"s preview failed:\n{exc}", file=sys.stderr)
        return 1
    problems += validate(rendered) + secret_problems(rendered, dict(os.environ))
    for problem in problems:
        print(problem, file=sys.stderr)
    print("s.yaml: OK" if not problems else f"s.yaml: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
