"""The TensorRT and cuda-python versions the GPU backends support, and the one-line refusal of others.

TensorRT >= 10.3 (JetPack 6 ships 10.3) and 11.x (what PyPI's `tensorrt` resolves to now, CUDA 13):
the engines are built as strongly typed networks (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`),
the only mode TensorRT 11 has, so one code path serves both. cuda-python 12.x (`cuda.cudart`, or
`cuda.bindings.runtime` from 12.6) and 13.x (`cuda.bindings.runtime`). The same ranges pin
pyproject.toml's `gpu` extra (a test keeps them equal); `tools/gpu_api_surface.py` checks that every
TensorRT and cuda-python name the code uses exists at both ends of the ranges.
"""

from __future__ import annotations

import re
from typing import Optional

from .gpu_errors import GpuUnavailableError

TENSORRT_RANGE = ((10, 3), (12, 0))  # [min, max): 10.3 <= version < 12
CUDA_PYTHON_RANGE = ((12, 0), (14, 0))  # 12.x and 13.x
TENSORRT_PIN = "tensorrt>=10.3,<12"
CUDA_PYTHON_PIN = "cuda-python>=12.0,<14"


def _major_minor(version: str) -> Optional[tuple[int, int]]:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_version(package: str, version: str, supported: tuple, pin: str) -> None:
    """Refuse, in one line, a `package` version outside [supported[0], supported[1])."""
    found = _major_minor(version)
    low, high = supported
    if found is None or not low <= found < high:
        raise GpuUnavailableError(f"{package} {version or '(unknown version)'} is not supported: adainfer's GPU backends "
                                  f"need {pin} (pip install '{pin}')")


def check_tensorrt(trt) -> None:
    check_version("tensorrt", getattr(trt, "__version__", ""), TENSORRT_RANGE, TENSORRT_PIN)


def cuda_python_version() -> str:
    from importlib import metadata

    for name in ("cuda-python", "cuda-bindings"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""


def check_cuda_python(version: Optional[str] = None) -> None:
    check_version("cuda-python", cuda_python_version() if version is None else version, CUDA_PYTHON_RANGE,
                  CUDA_PYTHON_PIN)
