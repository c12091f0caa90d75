"""`/openapi.json` generated from the request models and the route table; Swagger UI at `/docs`.

The Swagger UI assets come from the `swagger-ui-bundle` package (no CDN: FC functions and offline
laptops load the page all the same).
"""
from __future__ import annotations

from flask import Blueprint, current_app, send_from_directory

from . import payloads
from .errors import json_response

bp = Blueprint("docs", __name__)

REQUEST_MODELS = {
    "/sdapi/v1/txt2img": payloads.TXT2IMG,
    "/sdapi/v1/img2img": payloads.IMG2IMG,
    "/sdapi/v1/extra-single-image": payloads.EXTRAS_SINGLE,
    "/sdapi/v1/extra-batch-images": payloads.EXTRAS_BATCH,
    "/sdapi/v1/png-info": payloads.PNG_INFO,
    "/sdapi/v1/interrogate": payloads.INTERROGATE,
}

SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sdfc - Swagger UI</title>
<link rel="stylesheet" href="/static/swagger/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/static/swagger/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


def _error_schema() -> dict:
    return {"title": "HTTPError", "type": "object", "properties": {
        "error": {"type": "string"}, "detail": {"type": "string"}, "body": {"type": "string"},
        "errors": {"type": "string"}}}


def build_openapi(app) -> dict:
    paths: dict = {}
    schemas = {"HTTPError": _error_schema()}
    security = [{"HTTPBasic": []}]
    for rule in app.url_map.iter_rules():
        path = rule.rule
        if not path.startswith("/sdapi/v1/"):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            op = {"summary": path.rsplit("/", 1)[-1].replace("-", " ").capitalize(),
                  "operationId": f"{rule.endpoint}_{method.lower()}", "security": security,
                  "responses": {"200": {"description": "Successful Response"},
                                "401": {"description": "Not authenticated",
                                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPError"}}}},
                                "422": {"description": "Validation Error"}}}
            model = REQUEST_MODELS.get(path)
            if model is not None and method == "POST":
                schemas[model.name] = model.json_schema()
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.name}"}}}}
            paths.setdefault(path, {})[method.lower()] = op
    return {"openapi": "3.0.2", "info": {"title": "sdfc", "version": "1.10.1",
                                         "description": "A1111-compatible Stable Diffusion API on Function Compute"},
            "paths": dict(sorted(paths.items())),
            "components": {"schemas": schemas,
                           "securitySchemes": {"HTTPBasic": {"type": "http", "scheme": "basic"}}}}


@bp.get("/openapi.json")
def openapi():
    return json_response(build_openapi(current_app))


@bp.get("/docs")
def docs():
    return SWAGGER_PAGE, 200, {"Content-Type": "text/html; charset=utf-8"}


@bp.get("/static/swagger/<path:filename>")
def swagger_asset(filename: str):
    from swagger_ui_bundle import swagger_ui_path
    return send_from_directory(str(swagger_ui_path), filename)
