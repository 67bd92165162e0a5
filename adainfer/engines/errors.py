"""Errors of the GPU paths, defined in the runtime (which raises them too) and re-exported here."""

from ..runtime.gpu_errors import DeviceDecisionError, EngineError, EngineMismatchError, GpuUnavailableError

__all__ = ["DeviceDecisionError", "EngineError", "EngineMismatchError", "GpuUnavailableError"]
