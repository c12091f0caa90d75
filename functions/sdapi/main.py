"""sd-api's entrypoint: gunicorn serves `app` (see the Dockerfile's CMD); the logic is in sdfc.fc.compose."""
import logging

from sdfc.config import Settings
from sdfc.fc.compose import create_sdapi_app

# gunicorn configures only its own loggers: without this the per-request JSON lines would go nowhere.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

settings = Settings.from_env()
settings.check_listen("0.0.0.0")  # a ConfigError here stops the worker: no open API without strong SDFC_AUTH
app = create_sdapi_app(settings)
