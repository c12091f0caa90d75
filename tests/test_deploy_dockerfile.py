"""The sd-api Dockerfile, statically: hadolint (from PyPI) and the rules that matter to FC and to us: per CUDA
line (build argument CUDA) a pinned CUDA + cuDNN 9 base matching its locked onnxruntime-gpu (13: 1.31.1, 12:
1.26.0), a non-root user, no secrets, port 9000, an exec-form command, locked dependencies."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from sdfc.server import ServerConfig

from .deploy_support import (DOCKERFILE, ROOT, check, container_command, exec_form, hadolint, image_env,
                             instructions, last)

ENTRYPOINT = ROOT / "functions/sdapi/main.py"
# Each CUDA line: its lock and the onnxruntime-gpu it must hold (the libcudart it links, read off the wheels).
CUDA_LINES = {"13": "onnxruntime-gpu==1.31.1", "12": "onnxruntime-gpu==1.26.0"}


def lock_of(cuda: str) -> Path:
    return ROOT / f"functions/sdapi/requirements-cuda{cuda}.txt"


LOCK = lock_of("13")


def build_args() -> dict:
    return {name: value for name, _, value in
            (rest.partition("=") for kw, rest in instructions() if kw == "ARG" and "=" in rest)}


def expand(text: str, args: dict) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], text)


def base_image(cuda: str | None = None) -> str:
    """The image the final stage starts from when built with --build-arg CUDA=`cuda` (default: the ARG's)."""
    args = {**build_args(), **({"CUDA": cuda} if cuda else {})}
    stages = {}
    for kw, rest in instructions():
        if kw == "FROM":
            words = rest.split()
            image = expand(words[0], args)
            if len(words) == 3 and words[1].upper() == "AS":
                stages[words[2]] = stages.get(image, image)
            final = stages.get(image, image)
    return final


def test_hadolint_passes():
    hadolint(DOCKERFILE)


@pytest.mark.parametrize("cuda", sorted(CUDA_LINES))
def test_each_cuda_line_has_a_pinned_cudnn_runtime_base_and_the_onnxruntime_gpu_built_for_it(cuda):
    image = base_image(cuda)
    name, _, tag = image.partition(":")
    assert "@sha256:" in image or re.fullmatch(rf"{cuda}\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", tag), image
    assert name == "nvidia/cuda" and "latest" not in tag
    lock = lock_of(cuda).read_text()
    assert CUDA_LINES[cuda] in lock  # 1.27+ link libcudart.so.13, 1.26 libcudart.so.12; both cuDNN 9
    assert not re.search(r"^onnxruntime==", lock, re.MULTILINE)  # never beside the CPU build
    # Apart from onnxruntime-gpu, both images hold exactly the same packages.
    others = {re.sub(r"onnxruntime-gpu==\S+", "", line) for line in lock.splitlines() if "==" in line}
    assert others == {re.sub(r"onnxruntime-gpu==\S+", "", line) for line in LOCK.read_text().splitlines()
                      if "==" in line}


def test_the_default_image_is_the_cuda_13_line_and_the_lock_follows_the_build_argument():
    assert build_args()["CUDA"] == "13" and base_image().startswith("nvidia/cuda:13.")
    assert any(kw == "COPY" and "requirements-cuda${CUDA}.txt" in rest for kw, rest in instructions())
    assert sorted(p.name for p in (ROOT / "functions/sdapi").glob("requirements-cuda*.txt")) == \
        [lock_of(c).name for c in sorted(CUDA_LINES)]


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


@pytest.mark.parametrize("cuda", sorted(CUDA_LINES))
def test_dependencies_install_from_the_lock_with_hashes(cuda):
    assert any("--require-hashes" in rest and "requirements.txt" in rest
               for kw, rest in instructions() if kw == "RUN")
    lock = lock_of(cuda)
    entries = re.findall(r"^([A-Za-z0-9._-]+)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}$", lock.read_text(),
                         re.MULTILINE)
    assert len(entries) == lock.read_text().count("==")
    locked = {re.sub(r"[-_.]+", "-", name).lower() for name, _ in entries}
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.MULTILINE | re.DOTALL).group(1)
    for requirement in re.findall(r'"([^"]+)"', dependencies):
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement)[0]).lower()
        assert name in locked, f"{requirement} (pyproject) is not in {lock.name}: re-run deploy/lock.py"


def test_the_build_context_is_limited_to_what_the_image_copies():
    lines = (ROOT / "functions/sdapi/Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # everything out, then each copied path back in
    copied = [src for kw, rest in instructions() if kw == "COPY"
              for src in [w for w in rest.split() if not w.startswith("--")][:-1]]
    for source in copied:
        source = expand(source, build_args()).rstrip("/")
        assert any(line.startswith("!") and source.startswith(line[1:].rstrip("/")) for line in ignore), source


@pytest.mark.parametrize("path", ["/opt/sdfc/models"])
def test_models_are_baked_where_the_image_env_looks(path):
    assert image_env()["SDFC_MODELS_DIR"] == path
    assert any(kw == "COPY" and rest.split()[-1].rstrip("/") == path for kw, rest in instructions())
