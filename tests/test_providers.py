"""Execution providers per device (sdfc/engine/providers.py): CUDA's options as ONNX Runtime names them, host
threads that do not spin on a GPU instance, and the CPU fallback of every component seen (not only the UNet's)."""
from __future__ import annotations

import onnxruntime as ort
import pytest

from sdfc.engine import providers

from .conftest import TINY_MODEL


def test_cuda_options_are_the_documented_names_and_string_values():
    options = providers.CudaOptions(gpu_mem_limit_mb=20_000).provider_options()
    assert options == {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC",
                       "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "1",
                       "gpu_mem_limit": str(20_000 * 2**20)}
    exhaustive = providers.CudaOptions(cudnn_conv_algo_search="EXHAUSTIVE").provider_options()
    assert exhaustive["cudnn_conv_algo_search"] == "EXHAUSTIVE" and "gpu_mem_limit" not in exhaustive
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        providers.CudaOptions(cudnn_conv_algo_search="FASTEST")
    with pytest.raises(ValueError, match="gpu_mem_limit_mb"):
        providers.CudaOptions(gpu_mem_limit_mb=0)


def test_provider_lists_per_device():
    assert providers.providers_for("cpu") == ["CPUExecutionProvider"]
    cuda, cpu = providers.providers_for("cuda")
    assert cuda[0] == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="unknown device"):
        providers.providers_for("tpu")


def test_cuda_sessions_use_two_threads_that_do_not_spin():
    options = ort.SessionOptions()
    providers.tune_session_options(options, "cuda")
    assert options.intra_op_num_threads == providers.CUDA_INTRA_OP_THREADS
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    cpu = ort.SessionOptions()
    providers.tune_session_options(cpu, "cpu", threads=3)
    assert cpu.intra_op_num_threads == 3


def test_a_cuda_request_on_a_machine_without_cuda_is_seen_for_every_component():
    """onnxruntime quietly runs a session on the CPU when CUDA is missing: each component's fallback is named."""
    seen = {}
    for component in ("text_encoder", "unet", "vae_decoder"):
        options = ort.SessionOptions()
        providers.tune_session_options(options, "cuda")
        with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
            session = ort.InferenceSession(str(TINY_MODEL / component / "model.onnx"), options,
                                           providers=providers.providers_for("cuda"))
        seen[component] = session.get_providers()
    assert providers.fallbacks(seen, "cuda") == ["text_encoder", "unet", "vae_decoder"]
    assert providers.fallbacks(seen, "cpu") == []
    assert providers.fallbacks({"unet": ["CUDAExecutionProvider", "CPUExecutionProvider"]}, "cuda") == []


def test_the_gpu_stack_reads_as_none_without_a_gpu_and_decodes_versions():
    from sdfc.engine import device_info

    stack = device_info.gpu_stack()
    assert set(stack) == {"gpu", "driver", "driver_cuda", "cuda_runtime", "cudnn"}
    if not device_info.shutil.which("nvidia-smi"):
        assert stack["gpu"] is None and stack["driver"] is None
    assert device_info._major_minor(13000) == "13.0" and device_info._major_minor(12080) == "12.8"
    assert device_info._cudnn(90800) == "9.8.0" and device_info._major_minor(None) is None


def test_the_configured_options_reach_every_session_of_a_cuda_model():
    """SDFC_* variables → Settings → Engine → each component's session (here: CPU fallbacks, all named)."""
    import warnings

    from sdfc.config import ConfigError, Settings
    from sdfc.engine import Engine

    settings = Settings.from_env({"SDFC_CUDNN_CONV_ALGO_SEARCH": "exhaustive", "SDFC_GPU_MEM_LIMIT_MB": "8000"})
    assert Settings.from_env({}).cuda is None  # nothing set: the engine's defaults, no engine import needed
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        Settings.from_env({"SDFC_CUDNN_CONV_ALGO_SEARCH": "fastest"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime: CUDA is not available here
        model = Engine(TINY_MODEL, device="cuda", cuda=settings.cuda).load()
    (name, options), cpu = model.providers_asked
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert options["gpu_mem_limit"] == str(8000 * 2**20)
    assert model.cpu_fallbacks == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert Engine(TINY_MODEL).load().cpu_fallbacks == []
