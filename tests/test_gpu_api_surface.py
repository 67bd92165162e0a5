"""Every TensorRT and cuda-python name the code uses exists in the supported versions (no GPU needed:
tools/gpu_api_surface.py reads the TensorRT bindings wheels and imports cuda-python in venvs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_api_surface as surface  # noqa: E402

CACHE = Path("/tmp/adainfer-gpu-api")  # wheels and venvs are reused between runs


def test_the_names_come_from_the_code():
    trt, cuda = surface.tensorrt_names(), surface.cuda_names()
    for name in ("STRONGLY_TYPED", "set_tensor_address", "set_input_shape", "execute_async_v3", "create_network",
                 "build_serialized_network", "deserialize_cuda_engine", "nptype", "__version__"):
        assert name in trt, name
    for gone in ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "IInt8EntropyCalibrator2", "int8_calibrator"):
        assert gone not in trt, gone
    assert {"cudaMemcpy2DAsync", "cudaMemcpyKind.cudaMemcpyDeviceToDevice", "cudaError_t.cudaErrorNoDevice"} <= set(cuda)


@pytest.fixture(scope="module")
def result():
    try:
        return surface.surface(CACHE)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"PyPI unreachable, the API surface was NOT checked: {exc.stderr!r:.200}")


def test_every_name_exists_in_tensorrt_10_3_and_11_4_and_cuda_python_12_and_13(result):
    assert result["missing"] == []
    assert result["cuda-python"]["12.x"]["version"].startswith("12.")
    assert result["cuda-python"]["13.x"]["version"].startswith("13.")


def test_the_wheel_check_tells_the_two_tensorrt_apis_apart(result):
    """What TensorRT 11 removed is seen missing there, and present in 10.3: the check can fail."""
    old = surface.WheelNames(surface.download(surface.TRT_WHEELS["10.3"], CACHE))
    new = surface.WheelNames(surface.download(surface.TRT_WHEELS["11.4"], CACHE))
    for name in ("OBEY_PRECISION_CONSTRAINTS", "IInt8EntropyCalibrator2", "set_calibration_profile", "int8_calibrator"):
        assert name in old and name not in new, name
    assert "STRONGLY_TYPED" in old and "STRONGLY_TYPED" in new and "not_a_tensorrt_name" not in old
