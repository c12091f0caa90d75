"""The training function's image (functions/train), statically, as the sd-api image is checked: hadolint, a non-root
user, no secrets, port 9000, an exec-form command running its entrypoint, dependencies from a hashed lock that
pins the trainer's stack as the tests use it (torch, diffusers, transformers, peft) and holds no onnxruntime."""
from __future__ import annotations

import json
import re
import runpy
import shlex

from .deploy_support import ROOT, check, hadolint, instructions, lock

DOCKERFILE = ROOT / "functions/train/Dockerfile"
LOCK = ROOT / "functions/train/requirements.txt"
ENTRYPOINT = ROOT / "functions/train/main.py"
STEPS = instructions(DOCKERFILE)


def last(keyword: str) -> str | None:
    found = [rest for kw, rest in STEPS if kw == keyword]
    return found[-1] if found else None


def env() -> dict:
    values = {}
    for keyword, rest in STEPS:
        if keyword == "ENV":
            values.update(item.partition("=")[::2] for item in shlex.split(rest))
    return values


def locked() -> dict[str, str]:
    entries = re.findall(r"^([A-Za-z0-9._-]+)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}$", LOCK.read_text(),
                         re.MULTILINE)
    assert len(entries) == LOCK.read_text().count("=="), "an entry of the lock has no hash"
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in entries}


def test_hadolint_passes():
    hadolint(DOCKERFILE)


def test_non_root_no_secrets_port_9000_and_an_exec_form_command():
    assert last("USER").split(":")[0] not in ("root", "0")
    text = DOCKERFILE.read_text()
    assert not [n for n in env() if check.SECRET_NAME.search(n)] and not check.SECRET_VALUE.search(text)
    assert "SDFC_DATABASE_URL" not in text and "SDFC_AUTH" not in text
    assert last("EXPOSE") == "9000" and env()["SDFC_PORT"] == "9000"
    command = json.loads(last("CMD"))
    assert command[:2] == ["python", "-m"] and last("ENTRYPOINT") is None
    assert ROOT / (command[2].replace(".", "/") + ".py") == ENTRYPOINT
    entry = runpy.run_path(str(ENTRYPOINT))  # not as __main__: nothing is served
    assert entry["bind"](env()) == ("0.0.0.0", 9000)


def test_dependencies_install_from_a_hashed_lock_of_the_trainers_stack():
    assert any("--require-hashes" in rest and "requirements.txt" in rest and "--no-deps" in rest
               for kw, rest in STEPS if kw == "RUN")
    versions = locked()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate"):  # the versions the tests train with
        pinned = re.search(rf'"{name}==([^"]+)"', pyproject).group(1)
        assert versions[name] == pinned, (name, versions[name], pinned)
    for name in ("safetensors", "numpy", "pillow", "flask", "pymysql", "tokenizers"):
        assert name in versions, name  # what sdfc's task store and the trainers import
    assert not [n for n in versions if n.startswith("onnxruntime")]  # this function never serves images
    assert lock.omitted_names(ROOT / "functions/train/requirements.in") == set()


def test_the_build_context_is_limited_to_what_the_image_copies():
    lines = (ROOT / "functions/train/Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    copied = [src for kw, rest in STEPS if kw == "COPY" for src in [w for w in rest.split()
                                                                    if not w.startswith("--")][:-1]]
    assert copied
    for source in copied:
        assert any(line.startswith("!") and source.rstrip("/").startswith(line[1:].rstrip("/")) for line in ignore), \
            source
