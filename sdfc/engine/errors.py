"""What the engine raises. Each message names the offending value so that the API can pass it on."""


class EngineError(Exception):
    """Base of every engine failure."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be run as asked (unknown sampler, bad size, ...): a client error."""


class ModelNotFoundError(EngineError):
    """No model where one was expected."""


class ModelLoadError(EngineError):
    """A model file exists but cannot be loaded (corrupt ONNX, bad manifest)."""


class OutOfMemoryError(EngineError, MemoryError):
    """An allocation failed while running a job; the process stays usable (nothing is kept from the job)."""


class NaNError(EngineError):
    """A stage produced NaNs (fp16 overflow, broken weights)."""


class Interrupted(EngineError):
    """Raised inside sampling when the job was interrupted or skipped; the pipeline catches it."""
