"""schemathesis against the live server's own `/openapi.json`, with credentials and all its checks.

Every documented operation gets generated requests, valid and invalid ones, over a real socket; each answer
must be one the document promises (status, content type, headers, body schema), valid requests must be
accepted and invalid ones refused, auth must not be ignored, and nothing may answer 5xx except the routes
the document marks 501 (A1111 routes sdfc does not implement). Bounded: a few examples per operation,
one worker, a time budget, and the server's limits (which the document states) small.

schemathesis runs as its CLI (`schemathesis run`): its pytest plugin's lazy schema loading does not work
with pytest 9, and the CLI runs every phase (examples, coverage, fuzzing, stateful) the way users run it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests

from .live_server import PASSWORD, USER, start_server

MAX_EXAMPLES = 8
MAX_TIME_S = 150
# A1111's defaults (512², 50 steps) must stay valid: the hooks lower sizes before each call instead.
# One image per request makes batch_size × n_iter ≤ SDFC_MAX_IMAGES exact in the document.
LIMITS = {"SDFC_MAX_PIXELS": str(512 * 512), "SDFC_MAX_IMAGES": "1", "SDFC_MAX_BODY_BYTES": str(1024 * 1024)}
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
ROOT = Path(__file__).resolve().parent.parent


def _config(document: dict) -> str:
    """schemathesis.toml: all checks; only an operation documented as 501 may answer 501."""
    not_implemented = sorted(op["operationId"] for methods in document["paths"].values()
                             for op in methods.values() if "501" in op["responses"])
    lines = [
        "[checks]", "enabled = true", "",
        # The schema's own security scheme, so that schemathesis knows which requests carry credentials.
        "[auth.openapi.HTTPBasic]", f'username = "{USER}"', f'password = "{PASSWORD}"', "",
        "[generation]", f"max-examples = {MAX_EXAMPLES}", "",
        "[phases.stateful]", "enabled = false", "",
    ]
    for operation_id in not_implemented:
        lines += ["[[operations]]", f'include-operation-id = "{operation_id}"',
                  'checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "501"]', ""]
    return "\n".join(lines)


def test_api_conforms_to_its_openapi_document(tmp_path):
    server = start_server(tmp_path, env=LIMITS)
    try:
        document = requests.get(server.url + "/openapi.json", timeout=10).json()
        paths = document["paths"]
        # What issue 15 #9 found missing: the 400/404/501 answers and POST /options' body.
        assert {"400", "404", "401", "422"} <= set(paths["/sdapi/v1/img2img"]["post"]["responses"])
        assert "501" in paths["/sdapi/v1/interrogate"]["post"]["responses"]
        options_body = paths["/sdapi/v1/options"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert options_body == {"$ref": "#/components/schemas/OptionsUpdate"}
        assert document["components"]["schemas"]["OptionsUpdate"]["properties"]["CLIP_stop_at_last_layers"]["type"]
        config = tmp_path / "schemathesis.toml"
        config.write_text(_config(document))
        env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.schemathesis_hooks",
                   PYTHONPATH=str(ROOT))
        # cwd: schemathesis keeps a crash cache in ./.schemathesis; a fresh one per run keeps runs alike.
        run = subprocess.run(
            [str(SCHEMATHESIS), "--config-file", str(config), "run", server.url + "/openapi.json",
             "--checks", "all", "--workers", "1", "--seed", "15",
             "--request-timeout", "60", "--suppress-health-check", "all",
             "--no-color"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=MAX_TIME_S + 120)
        assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-4000:] + "\nserver log:\n" + server.log()[-3000:]
    finally:
        server.stop()
