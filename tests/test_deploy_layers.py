"""The CPU functions' layer zips (layers/build.py): `python/` layout, wheels FC's python3.10 can load, importable
from a clean interpreter with nothing but the layer on its path, byte-for-byte reproducible, under FC's size
limit."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .deploy_support import ROOT, layers_build


def target_interpreter() -> str | None:
    """A CPython of FC's runtime version, so the real (hash-locked, cp310) layer can be imported here."""
    wanted = f"python{layers_build.TARGET_PYTHON}"
    pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = sorted(glob.glob(f"{pyenv}/versions/{layers_build.TARGET_PYTHON}.*/bin/{wanted}"))
    for candidate in [*candidates, shutil.which(wanted)]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate  # (a pyenv shim exists for every version but runs only the selected ones)
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Both layers. For FC's target (CPython 3.10, glibc 2.28, hashes checked) when a 3.10 is here to import
    them with; otherwise the same pinned versions for this interpreter."""
    out = tmp_path_factory.mktemp("layers")
    python = target_interpreter()
    if python:
        layers = {n: layers_build.build(n, out) for n in layers_build.LAYERS}
    else:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        layers = {n: layers_build.build(n, out, python=version, hashes=False) for n in layers_build.LAYERS}
        python = sys.executable
    return {"layers": layers, "python": python, "target": python != sys.executable}


def unpack(layer, into: Path) -> Path:
    with zipfile.ZipFile(layer.path) as zf:
        zf.extractall(into)
    return into / "python"


def run_clean(python: str, layer_dir: Path, code: str, env: dict | None = None, cwd: Path | None = None):
    """-I: no PYTHONPATH, no user site; -S: no site-packages. Only the stdlib and the layer can be imported,
    as on FC where /opt/python is the layer."""
    prelude = f"import sys; sys.path[:0] = [{str(layer_dir)!r}, {str(cwd or layer_dir)!r}]\n"
    done = subprocess.run([python, "-I", "-S", "-c", prelude + code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_zips_hold_only_python_and_stay_under_fc_limits(built):
    for layer in built["layers"].values():
        names = zipfile.ZipFile(layer.path).namelist()
        assert names and all(n == "python/" or n.startswith("python/") for n in names), names[:5]
        assert not [n for n in names if "__pycache__" in n or n.startswith("python/bin/")]
        assert layer.size < layers_build.ZIP_LIMIT
        print(f"\n{layer.path.name}: {layer.files} files, {layer.unpacked / 2**20:.1f} MiB unpacked, "
              f"{layer.size / 2**20:.1f} MiB zipped")


def test_wheels_fit_fc_python_3_10_on_debian_10(built):
    if not built["target"]:
        pytest.skip("no CPython 3.10 here: the layers were built for this interpreter instead")
    for layer in built["layers"].values():
        with zipfile.ZipFile(layer.path) as zf:
            for name in (n for n in zf.namelist() if n.endswith(".dist-info/WHEEL")):
                for tag in re.findall(r"^Tag: (\S+)$", zf.read(name).decode(), re.MULTILINE):
                    python_tag, abi, platform = tag.split("-")
                    assert python_tag in ("py3", "py2.py3", "cp310") or abi == "abi3", tag
                    glibc = re.match(r"manylinux_2_(\d+)_x86_64|manylinux2014_x86_64|any", platform)
                    assert glibc and int(glibc.group(1) or 17) <= 28, tag


def test_the_web_layer_serves_an_fc_http_event_with_nothing_else_installed(built, tmp_path):
    python_dir = unpack(built["layers"]["web"], tmp_path)
    event = {"version": "v1", "rawPath": "/static/swagger/favicon-32x32.png", "headers": {},
             "queryParameters": {}, "requestContext": {"http": {"method": "GET"}, "requestId": "r-1"},
             "isBase64Encoded": False, "body": ""}
    code = ("import json, index\n"
            "class Context: request_id = 'req-layer-1'\n"
            f"print(json.dumps(index.handler(json.dumps({event!r}).encode(), Context())))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'tokenizers', 'torch')))\n")
    out = run_clean(built["python"], python_dir, code, cwd=ROOT / "functions" / "web",
                    env={"SDFC_DATA_DIR": str(tmp_path / "data"), "SDFC_AUTH": "alice:Wonder-land42"})
    response, heavy = out.strip().splitlines()[-2:]
    response = json.loads(response)
    assert response["statusCode"] == 200 and response["isBase64Encoded"] is True
    assert response["headers"]["Content-Type"] == "image/png"
    assert heavy == "[]"  # no engine stack on the CPU function


def test_the_records_layer_loads_the_records_entrypoint(built, tmp_path):
    python_dir = unpack(built["layers"]["records"], tmp_path)
    code = ("import index, importlib.metadata as m, pymysql\n"
            "index.initialize(None)\n"
            "print(m.version('sdfc'), pymysql.__file__)\n")
    out = run_clean(built["python"], python_dir, code, cwd=ROOT / "functions" / "records",
                    env={"SDFC_DATABASE_URL": f"sqlite:///{tmp_path / 'records.db'}",
                         "SDFC_OUTPUTS_DIR": str(tmp_path / "outputs")})
    version, pymysql_path = out.split()[-2:]
    assert version == layers_build.sdfc_version()
    assert pymysql_path.startswith(str(python_dir))  # the layer's pinned driver, not a runtime's


def test_the_same_tree_gives_the_same_bytes(built, tmp_path):
    again = layers_build.build("records", tmp_path, **({} if built["target"] else
                                                       {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                                                        "hashes": False}))
    first = built["layers"]["records"]
    assert hashlib.sha256(again.path.read_bytes()).hexdigest() == first.sha256


def test_zips_are_written_with_fixed_times_and_modes(tmp_path):
    tree = tmp_path / "tree"
    (tree / "python" / "pkg").mkdir(parents=True)
    (tree / "python" / "pkg" / "__init__.py").write_text("x = 1\n")
    os.utime(tree / "python" / "pkg" / "__init__.py", (1_700_000_000, 1_700_000_000))
    layers_build.write_zip(tree, tmp_path / "a.zip")
    os.utime(tree / "python" / "pkg" / "__init__.py", (1_800_000_000, 1_800_000_000))
    layers_build.write_zip(tree, tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    info = zipfile.ZipFile(tmp_path / "a.zip").getinfo("python/pkg/__init__.py")
    assert info.date_time == layers_build.ZIP_TIME and (info.external_attr >> 16) & 0o777 == 0o644
