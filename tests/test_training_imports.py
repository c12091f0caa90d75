"""The import-graph rule of the design: training (torch) lives outside the serving package's import graph. A fresh
interpreter builds every composition (create_app with every part, and FC's sd-api and web compositions), serves
the training routes' validation and the docs, and has imported neither `sdfc.training` nor torch."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from .conftest import TINY_MODEL

SCRIPT = textwrap.dedent("""
    import json, sys
    from sdfc.app import ALL_PARTS, create_app
    from sdfc.config import Settings
    from sdfc.fc.compose import create_sdapi_app, create_web_app

    data = sys.argv[1]
    settings = Settings.from_env({"SDFC_DATA_DIR": data, "SDFC_MODELS_DIR": sys.argv[2]})
    apps = [create_app(settings, parts=ALL_PARTS), create_sdapi_app(settings), create_web_app(settings)]
    client = apps[0].test_client()
    answers = [client.get("/openapi.json").status_code,
               client.post("/sdapi/v2/tasks/train-lora", json={"base": "../x"}).status_code,
               client.post("/sdapi/v2/tasks/train-embedding", json={}).status_code,
               client.post("/sdapi/v1/train/embedding", json={}).status_code,
               client.post("/sdapi/v1/create/embedding", json={"name": "../x"}).status_code]
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "sdfc.training")))
    print(json.dumps({"answers": answers, "loaded": loaded}))
""")


def test_no_serving_composition_imports_training_or_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(TINY_MODEL.parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["answers"] == [200, 422, 422, 422, 422], report  # the training routes did run (and refuse)
    assert report["loaded"] == [], report
