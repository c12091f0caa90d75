"""What GPU stack this process sees: the NVIDIA driver, the CUDA runtime and cuDNN that onnxruntime-gpu loads.

FC does not document the driver of its GPU instances, and onnxruntime-gpu 1.27+ needs CUDA 13 (driver 580 or
newer): `/initialize` reports these so that the first deployment tells which image fits (README "Which image").
Each figure is read from the library itself through ctypes, so no CUDA toolkit or Python binding is needed;
a missing library reads as None (a CPU machine reports all None).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess


def _version_from(library_names: tuple[str, ...], function: str, by_reference: bool) -> int | None:
    for name in library_names:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            call = getattr(library, function)
        except AttributeError:
            return None
        if by_reference:  # cudaError_t f(int *version)
            value = ctypes.c_int(0)
            return value.value if call(ctypes.byref(value)) == 0 else None
        call.restype = ctypes.c_size_t  # size_t cudnnGetVersion(void)
        return int(call())
    return None


def _major_minor(version: int | None) -> str | None:
    """CUDA's encoding: 1000 × major + 10 × minor (13000 → "13.0")."""
    return None if not version else f"{version // 1000}.{version % 1000 // 10}"


def _cudnn(version: int | None) -> str | None:
    """cuDNN 9's encoding: 10000 × major + 100 × minor + patch (90800 → "9.8.0")."""
    return None if not version else f"{version // 10000}.{version % 10000 // 100}.{version % 100}"


def _driver_release() -> tuple[str | None, str | None]:
    """(driver release such as "580.65.06", GPU name) from nvidia-smi, when it is on the PATH."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None, None
    if not out or "," not in out[0]:
        return None, None
    release, name = (part.strip() for part in out[0].split(",", 1))
    return release, name


def gpu_stack() -> dict[str, str | None]:
    release, name = _driver_release()
    return {
        "gpu": name,
        "driver": release,
        # The newest CUDA the driver supports, and the CUDA runtime and cuDNN actually loadable here.
        "driver_cuda": _major_minor(_version_from(("libcuda.so.1",), "cuDriverGetVersion", True)),
        "cuda_runtime": _major_minor(_version_from(("libcudart.so.13", "libcudart.so.12", "libcudart.so"),
                                                   "cudaRuntimeGetVersion", True)),
        "cudnn": _cudnn(_version_from(("libcudnn.so.9", "libcudnn.so"), "cudnnGetVersion", False)),
    }
