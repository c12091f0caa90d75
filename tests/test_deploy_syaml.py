"""s.yaml, offline: Serverless Devs renders it (`s preview`) with a placeholder environment, the rendered props
validate against the schemas in deploy/, secrets only come from the environment, and the resources fit
together (routes, roles, layers, the records function sd-api dispatches to)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from .deploy_support import ACCOUNT_ID, PLACEHOLDER_ENV, ROOT, check, image_env, layers_build, props, rendered, s_home

S_YAML_TEXT = (ROOT / "s.yaml").read_text()
FC3_SCHEMA = json.loads(check.SCHEMAS["fc3"].read_text())


def render_text(text: str, tmp_path: Path, env: dict = PLACEHOLDER_ENV) -> dict:
    """Render a variant of s.yaml (`s preview` does not read the code folders it names)."""
    variant = tmp_path / "s.yaml"
    variant.write_text(text)
    return check.render(env, s_home(), template=variant)


# --- renders and validates -----------------------------------------------------------------------------------

def test_s_preview_renders_every_resource():
    resources = rendered()["resources"]
    assert {name: r["component"] for name, r in resources.items()} == {
        "sdfc-records": "fc3", "sdfc-api": "fc3", "sdfc-web": "fc3", "sdfc-train": "fc3",
        "sdfc-domain": "fc3-domain"}
    assert rendered()["edition"] == "3.0.0"
    # ${config('AccountID')} came from the (dummy) access: every ARN is complete.
    assert props("sdfc-api")["role"] == f"acs:ram::{ACCOUNT_ID}:role/sdfc-api"


def test_rendered_props_validate_against_the_schemas():
    assert check.validate(rendered()) == []


def test_secrets_come_only_from_the_environment():
    assert check.env_problems(S_YAML_TEXT) == []
    assert check.secret_problems(rendered(), PLACEHOLDER_ENV) == []
    for name in check.SECRET_ENV:
        assert f"${{env('{name}')}}" in S_YAML_TEXT


def test_a_missing_required_variable_stops_the_render():
    env = {k: v for k, v in PLACEHOLDER_ENV.items() if k != "SDFC_DATABASE_URL"}
    with pytest.raises(check.RenderError, match="SDFC_DATABASE_URL"):
        check.render(env, s_home())


def test_a_default_on_a_required_variable_is_caught():
    text = S_YAML_TEXT.replace("${env('SDFC_AUTH')}", "${env('SDFC_AUTH', 'admin:Admin-1234')}", 1)
    assert any("SDFC_AUTH" in p and "default" in p for p in check.env_problems(text))


def test_a_hard_coded_secret_is_caught(tmp_path):
    text = S_YAML_TEXT.replace("SDFC_AUTH: ${env('SDFC_AUTH')}", "SDFC_AUTH: alice:Hard-coded42", 1)
    text = text.replace("SDFC_DEVICE: cuda", "SDFC_DEVICE: cuda\n        LEGACY_DB: mysql://root:hunter2@db:3306/x", 1)
    problems = check.secret_problems(render_text(text, tmp_path), PLACEHOLDER_ENV)
    assert any("SDFC_AUTH is hard-coded" in p for p in problems), problems
    assert any("LEGACY_DB" in p and "credential" in p for p in problems), problems


# --- the schema: fc3's, corrected for today's GPUs -----------------------------------------------------------

def schema_errors(props: dict) -> list[str]:
    return [e.message for e in jsonschema.Draft7Validator(FC3_SCHEMA).iter_errors(props)]


def gpu_function(gpu_type: str, gpu_memory: int, cpu: float, memory: int, **extra) -> dict:
    return {"region": "cn-hangzhou", "functionName": "f", "runtime": "custom-container",
            "customContainerConfig": {"image": "i", "port": 9000}, "cpu": cpu, "memorySize": memory,
            "gpuConfig": {"gpuType": gpu_type, "gpuMemorySize": gpu_memory}, **extra}


@pytest.mark.parametrize("gpu_type,gpu_memory,cpu,memory", [
    ("fc.gpu.tesla.1", 16384, 8, 32768), ("fc.gpu.ampere.1", 24576, 8, 32768),
    ("fc.gpu.ada.1", 49152, 8, 32768), ("fc.gpu.ada.1", 49152, 16, 98304),
    ("fc.gpu.ada.2", 24576, 8, 32768), ("fc.gpu.ada.3", 49152, 16, 65536),
    ("fc.gpu.hopper.1", 98304, 16, 98304),
])
def test_every_whole_card_fc_sells_today_is_accepted(gpu_type, gpu_memory, cpu, memory):
    assert schema_errors(gpu_function(gpu_type, gpu_memory, cpu, memory)) == []


@pytest.mark.parametrize("function,expected", [
    (gpu_function("fc.gpu.ada.1", 16384, 8, 32768), "49152 was expected"),          # a slice of a card
    (gpu_function("fc.gpu.tesla.1", 8192, 4, 16384), "16384 was expected"),
    (gpu_function("fc.gpu.hopper.1", 98304, 8, 98304), "8 is not one of [16]"),
    (gpu_function("fc.gpu.ada.2", 24576, 8, 98304), "98304 is not one of"),
    (gpu_function("fc.gpu.volta.1", 16384, 8, 32768), "'fc.gpu.volta.1' is not one of"),
    (gpu_function("fc.gpu.ada.1", 49152, 8, 32768, runtime="python3.10", code="./c", handler="i.h"),
     "'custom-container' was expected"),
    ({**gpu_function("fc.gpu.ada.1", 49152, 8, 32768),
      "customContainerConfig": {"image": "i", "caPort": 9000}}, "'caPort' was unexpected"),  # FC 2.0 spelling
    ({**gpu_function("fc.gpu.ada.1", 49152, 8, 32768),
      "instanceLifecycleConfig": {"initializer": {"handler": "x", "timeout": 600}}}, "600 is greater than"),
    ({**gpu_function("fc.gpu.ada.1", 49152, 8, 32768), "provisionConfig": {"defaultTarget": 1},
      "scalingConfig": {"minInstances": 1}}, "should not be valid"),
    ({"region": "cn-hangzhou", "functionName": "f", "runtime": "python3.10", "code": "c", "handler": "i.h",
      "memorySize": 65536}, "65536 is greater than the maximum of 32768"),             # CPU functions
    ({"region": "cn-hangzhou", "functionName": "f", "runtime": "python3.10", "code": "c", "handler": "i.h",
      "environmentVariables": {"FC_REGION": "x"}}, "does not match"),                  # FC_* is reserved
])
def test_the_schema_rejects_what_fc_would_refuse(function, expected):
    errors = schema_errors(function)
    assert any(expected in e for e in errors), errors


def test_the_deploy_check_adds_rules_a_schema_cannot_say():
    cpu_function = {"region": "cn-hangzhou", "functionName": "f", "runtime": "python3.10", "code": "c",
                    "handler": "i.h", "cpu": 0.33, "memorySize": 4096,
                    "environmentVariables": {"BIG": "x" * 5000}}
    problems = check.validate({"resources": {"f": {"component": "fc3", "props": cpu_function}}})
    assert any("multiple of 0.05" in p for p in problems)
    assert any("1 to 4 GB per vCPU" in p for p in problems)
    assert any("over FC's 4096" in p for p in problems)


# --- the resources fit together ------------------------------------------------------------------------------

def test_sd_api_is_a_gpu_container_on_port_9000_with_lifecycle_hooks():
    api = props("sdfc-api")
    assert api["runtime"] == "custom-container" and api["customContainerConfig"]["port"] == 9000
    assert api["customContainerConfig"]["image"] == PLACEHOLDER_ENV["SDFC_IMAGE"]
    assert api["gpuConfig"] == {"gpuType": "fc.gpu.ada.1", "gpuMemorySize": 49152}
    hooks = api["instanceLifecycleConfig"]
    assert hooks["initializer"]["timeout"] == 300 and hooks["preStop"]["timeout"] == 90
    drain = float(api["environmentVariables"]["SDFC_DRAIN_SECONDS"])
    assert drain < hooks["preStop"]["timeout"]


def test_server_threads_cover_the_instance_concurrency():
    threads = int(props("sdfc-api")["environmentVariables"].get("SDFC_THREADS") or image_env()["SDFC_THREADS"])
    assert threads >= props("sdfc-api")["instanceConcurrency"]


def test_http_triggers_are_anonymous_and_the_records_function_has_none():
    for name in ("sdfc-api", "sdfc-web"):
        (trigger,) = props(name)["triggers"]
        assert trigger["triggerType"] == "http" and trigger["triggerConfig"]["authType"] == "anonymous"
        assert "SDFC_AUTH" in props(name)["environmentVariables"]  # so the app checks Basic auth itself
    assert "triggers" not in props("sdfc-records")


def test_sd_api_dispatches_to_the_records_function_with_retries_and_a_dead_letter_queue():
    records, api = props("sdfc-records"), props("sdfc-api")
    assert api["environmentVariables"]["SDFC_DISPATCH"] == "fc3"
    assert api["environmentVariables"]["SDFC_RECORDS_FUNCTION"] == records["functionName"]
    async_config = records["asyncInvokeConfig"]
    assert async_config["maxAsyncRetryAttempts"] >= 1
    assert async_config["destinationConfig"]["onFailure"]["destination"] == \
        f"acs:mns:cn-hangzhou:{ACCOUNT_ID}:/queues/sdfc-records-dlq/messages"
    assert records["vpcConfig"]["vpcId"] == PLACEHOLDER_ENV["SDFC_VPC_ID"]  # RDS is reached in its VPC


def test_the_ram_policies_grant_what_the_functions_do():
    api_policy = json.loads((ROOT / "deploy/ram/sdfc-api-policy.json").read_text())
    (statement,) = api_policy["Statement"]
    assert statement["Action"] == ["fc:InvokeFunction"]
    assert f"acs:fc:*:*:functions/{props('sdfc-records')['functionName']}" in statement["Resource"]
    assert props("sdfc-api")["role"].endswith("/sdfc-api")
    records_policy = json.loads((ROOT / "deploy/ram/sdfc-records-policy.json").read_text())
    queue = re.search(r"/queues/([^/]+)/", props("sdfc-records")["asyncInvokeConfig"]["destinationConfig"]
                      ["onFailure"]["destination"]).group(1)
    assert records_policy["Statement"][0]["Resource"] == [f"acs:mns:*:*:/queues/{queue}/messages"]


def test_the_oss_mount_variant_has_a_read_only_policy_for_the_role_that_mounts_it():
    policy = json.loads((ROOT / "deploy/ram/sdfc-api-oss-models-policy.json").read_text())
    (statement,) = policy["Statement"]
    assert set(statement["Action"]) >= {"oss:ListObjects", "oss:GetObject"}
    assert not [a for a in statement["Action"] if a.startswith(("oss:Put", "oss:Delete"))]  # models: read only
    assert "sdfc-api-oss-models-policy.json" in (ROOT / "s.yaml").read_text()


def test_the_functions_share_one_nas_folder_for_outputs():
    mounts = {name: props(name)["nasConfig"] for name in ("sdfc-api", "sdfc-web", "sdfc-records", "sdfc-train")}
    assert len({json.dumps(m, sort_keys=True) for m in mounts.values()}) == 1
    (mount,) = mounts["sdfc-api"]["mountPoints"]
    assert mounts["sdfc-api"]["userId"] == 10001  # the image's USER, so files stay readable by every function
    for name in mounts:
        assert props(name)["environmentVariables"]["SDFC_OUTPUTS_DIR"].startswith(mount["mountDir"] + "/")
    # sd-api's records wait on the NAS, not on the instance's disk, which FC discards with a recycled instance.
    assert props("sdfc-api")["environmentVariables"]["SDFC_SPOOL_DIR"].startswith(mount["mountDir"] + "/")


def test_cpu_functions_use_the_runtime_and_layers_layers_build_makes():
    for name, layer in (("sdfc-web", "web"), ("sdfc-records", "records")):
        function = props(name)
        assert function["runtime"] == layers_build.RUNTIME and "gpuConfig" not in function
        (arn,) = function["layers"]
        assert re.fullmatch(rf"acs:fc:cn-hangzhou:{ACCOUNT_ID}:layers/sdfc-{layer}/versions/\d+", arn)
        assert layer in layers_build.LAYERS
        assert (ROOT / function["code"] / "index.py").is_file()


def test_the_custom_domain_sends_sdapi_to_the_gpu_and_the_rest_to_the_cpu_function():
    routes = {r["path"]: r["functionName"] for r in props("sdfc-domain")["routeConfig"]["routes"]}
    assert routes == {"/sdapi/*": props("sdfc-api")["functionName"], "/*": props("sdfc-web")["functionName"]}


def test_train_tasks_go_to_a_gpu_training_function_that_writes_where_sd_api_reads():
    api, train = props("sdfc-api"), props("sdfc-train")
    assert api["environmentVariables"]["SDFC_TRAINING_FUNCTION"] == train["functionName"]
    assert train["runtime"] == "custom-container" and train["customContainerConfig"] == {
        "image": PLACEHOLDER_ENV["SDFC_TRAIN_IMAGE"], "port": 9000}
    assert train["gpuConfig"] == api["gpuConfig"] and train["instanceConcurrency"] == 1
    # a run is one asynchronous invocation, allowed to last as long as the request bounds let it
    assert train["asyncInvokeConfig"]["asyncTask"] is True and train["timeout"] == 86400
    assert "triggers" not in train  # sd-api's async invocations are its only calls
    for folder in ("SDFC_LORA_DIR", "SDFC_EMBEDDINGS_DIR", "SDFC_TRAINING_DIR", "SDFC_OUTPUTS_DIR",
                   "SDFC_DATABASE_URL"):
        assert train["environmentVariables"][folder] == api["environmentVariables"][folder], folder
    assert train["nasConfig"] == api["nasConfig"] and train["vpcConfig"] == api["vpcConfig"]
    policy = json.loads((ROOT / "deploy/ram/sdfc-api-policy.json").read_text())
    assert f"acs:fc:*:*:functions/{train['functionName']}" in policy["Statement"][0]["Resource"]
    assert (ROOT / "functions/train/Dockerfile").is_file()
