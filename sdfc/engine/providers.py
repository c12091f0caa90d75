"""Which execution provider runs the sessions, and how it is set up per device.

The CPU choices (one arena shared by every session, memory patterns off) were measured on the CPU bench; a GPU
needs its own: CUDA's provider options (ONNX Runtime's CUDA execution provider documentation) and few host
threads, because an FC GPU instance has few vCPUs and the host threads only launch kernels there.
"""
from __future__ import annotations

from dataclasses import dataclass

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("cpu", "cuda")
CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
# Host threads for a CUDA session: kernels are launched from one thread; a second helps the few CPU ops left.
CUDA_INTRA_OP_THREADS = 2


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA execution provider's options, as ONNX Runtime names them (all values are strings there)."""

    device_id: int = 0
    # HEURISTIC: cuDNN's heuristics pick a convolution algorithm at once; EXHAUSTIVE benchmarks every one per new
    # input shape (seconds per shape, paid by the first request of each size); DEFAULT: cuDNN's default algorithm.
    cudnn_conv_algo_search: str = "HEURISTIC"
    gpu_mem_limit_mb: int | None = None  # None: no cap beyond the card's memory
    # Grow the arena by what is asked for, not by doubling: a doubled arena can claim the memory a second model
    # (or the VAE at a larger size) needs later.
    arena_extend_strategy: str = "kSameAsRequested"
    # Copies on the default stream, ordered with the kernels: no race between an input copy and a kernel.
    do_copy_in_default_stream: bool = True
    # Not offered: CUDA graphs (enable_cuda_graph) replay fixed device buffers; the engine binds fresh ones per run.

    def __post_init__(self):
        if self.cudnn_conv_algo_search not in CONV_ALGO_SEARCHES:
            raise ValueError(f"cudnn_conv_algo_search must be one of {', '.join(CONV_ALGO_SEARCHES)}, "
                             f"got {self.cudnn_conv_algo_search!r}")
        if self.gpu_mem_limit_mb is not None and self.gpu_mem_limit_mb < 1:
            raise ValueError(f"gpu_mem_limit_mb must be at least 1, got {self.gpu_mem_limit_mb}")

    def provider_options(self) -> dict[str, str]:
        options = {
            "device_id": str(self.device_id),
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
            "arena_extend_strategy": self.arena_extend_strategy,
            "do_copy_in_default_stream": "1" if self.do_copy_in_default_stream else "0",
        }
        if self.gpu_mem_limit_mb is not None:
            options["gpu_mem_limit"] = str(self.gpu_mem_limit_mb * 1024 * 1024)
        return options


def providers_for(device: str, cuda: CudaOptions | None = None) -> list:
    """The `providers` argument of an InferenceSession for `device`: CUDA with its options, then the CPU for
    the few operators CUDA lacks."""
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        return [(CUDA, (cuda or CudaOptions()).provider_options()), CPU]
    raise ValueError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")


def tune_session_options(options, device: str, threads: int = 0) -> None:
    """Thread settings per device: on CUDA few intra-op threads that do not spin (a spinning thread burns a vCPU
    FC bills for while the GPU works); on the CPU the caller's count (0: one per core)."""
    if device == "cuda":
        options.intra_op_num_threads = threads or CUDA_INTRA_OP_THREADS
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif threads:
        options.intra_op_num_threads = threads


def fallbacks(session_providers: dict[str, list[str]], device: str) -> list[str]:
    """The components whose session does not run on `device`'s provider (CUDA asked for, the CPU given)."""
    if device != "cuda":
        return []
    return sorted(component for component, providers in session_providers.items() if CUDA not in providers)
