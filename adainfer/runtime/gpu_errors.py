"""Errors of the GPU paths: one line each, shown by the CLI as `adainfer: error: ...` (exit 2)."""

from ..errors import AdainferError


class EngineError(AdainferError):
    """Engines cannot be built, or the options asked for are inconsistent."""


class EngineMismatchError(EngineError):
    """The bundle's engines were built for another GPU, TensorRT version or manifest."""


class GpuUnavailableError(AdainferError):
    """A GPU backend was asked for where there is no CUDA device or no tensorrt / cuda-python."""


class DeviceDecisionError(EngineError):
    """An exit policy that a GPU backend cannot execute on the device (e.g. an ONNX-ML classifier on TensorRT)."""


class CudaError(AdainferError):
    """A CUDA runtime call failed on a device that was found (one line: the call and CUDA's error name)."""
