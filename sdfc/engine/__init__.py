"""The lean Stable Diffusion runtime: onnxruntime + numpy + tokenizers, no torch.

Knows nothing of HTTP or databases: `Engine(models_dir).generate(GenerationRequest(...))`.
"""
from .errors import (EngineError, Interrupted, InvalidRequestError, ModelLoadError, ModelNotFoundError,
                     NaNError, OutOfMemoryError)
from .models import ModelInfo
from .pipeline import Engine, GenerationRequest, GenerationResult, JobControl

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "JobControl", "ModelInfo", "EngineError",
           "InvalidRequestError", "ModelNotFoundError", "ModelLoadError", "NaNError", "Interrupted",
           "OutOfMemoryError"]
