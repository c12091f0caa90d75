"""FC entrypoint of the web function (gallery, docs, pages): built-in runtime python3.10, HTTP trigger.

handler: index.handler. FC 3.0 hands an HTTP trigger's request to the handler as a JSON event; sdfc.fc.events
replays it through the Flask app (sdfc.fc.compose.create_web_app), built once per instance at import.
"""
import json
import logging
import os
import sys

# FC puts the layer (/opt/python) on the path; first, so that its pinned versions win over the packages the
# python3.10 image preinstalls (an older Pillow among them).
if os.path.isdir("/opt/python") and sys.path[:1] != ["/opt/python"]:
    sys.path.insert(0, "/opt/python")

from sdfc.fc import events  # noqa: E402
from sdfc.fc.compose import create_web_app  # noqa: E402

# The per-request JSON lines are INFO: keep the runtime's handler if it has one, else write to stderr.
if logging.getLogger().handlers:
    logging.getLogger().setLevel(logging.INFO)
else:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_web_app()


def handler(event, context):
    try:
        call = events.call_from_event(event)
    except events.EventError as exc:
        return {"statusCode": 400, "headers": {"Content-Type": "application/json"}, "isBase64Encoded": False,
                "body": json.dumps({"detail": str(exc)})}
    return events.run(app, call, {"x-fc-request-id": getattr(context, "request_id", "")})
