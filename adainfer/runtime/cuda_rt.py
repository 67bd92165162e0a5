"""The few CUDA runtime calls the GPU paths need, through cuda-python (no torch, no pycuda).

Imported lazily: importing this module never needs CUDA; `cudart()` does. cuda-python calls
return a tuple whose first item is the error code (`err, ptr = cudaMalloc(n)`), as in
TensorRT's samples/python/common_runtime.py.
"""

from __future__ import annotations


import numpy as np

from ..engines.errors import GpuUnavailableError
from ..engines.metadata import DeviceInfo

INSTALL_HINT = "pip install 'adainfer[gpu]' on an NVIDIA GPU machine; on Jetson see docs/jetson.md"
_CUDART = None


def cudart():
    """The cuda-python runtime module (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    global _CUDART
    if _CUDART is None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            try:
                from cuda import cudart as rt
            except ImportError:
                raise GpuUnavailableError(f"the GPU backends need cuda-python ({INSTALL_HINT})") from None
        _CUDART = rt
    return _CUDART


def check(result):
    """Unwrap a cuda-python call: raise on an error code, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    rt = cudart()
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def device_count() -> int:
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    return count if err == rt.cudaError_t.cudaSuccess else 0


def device_info(device: int = 0) -> DeviceInfo:
    """GPU name, compute capability and the installed TensorRT version."""
    trt = import_tensorrt()
    prop = check(cudart().cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(gpu=name.split("\x00")[0].strip(), compute_capability=f"{prop.major}.{prop.minor}",
                      tensorrt=trt.__version__)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise GpuUnavailableError(f"the tensorrt backend needs the tensorrt Python package ({INSTALL_HINT})") from None
    return trt


def require_gpu(need_tensorrt: bool = True) -> None:
    """Refuse, in one line, to go on without tensorrt / cuda-python / a CUDA device."""
    if need_tensorrt:
        import_tensorrt()
    if device_count() < 1:
        raise GpuUnavailableError("no CUDA device found (no NVIDIA GPU, or its driver is not loaded)")


class DeviceBuffer:
    """A cudaMalloc'd block; `ptr` is the device address TensorRT's set_tensor_address takes."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))

    def upload(self, array: np.ndarray, stream, offset: int = 0) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes + offset > self.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        if array.nbytes:
            rt = cudart()
            check(rt.cudaMemcpyAsync(self.ptr + offset, array.ctypes.data, array.nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def download(self, out: np.ndarray, stream, offset: int = 0) -> np.ndarray:
        if out.nbytes:
            rt = cudart()
            check(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr + offset, out.nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        return out

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0


def copy_rows(dst: int, src: int, rows: int, row_bytes: int, src_pitch: int, stream) -> None:
    """Device-to-device copy of `rows` rows of `row_bytes`, `src_pitch` apart (cudaMemcpy2DAsync):
    the last position of every sequence of (batch, seq, hidden) hidden states, in one call."""
    rt = cudart()
    check(rt.cudaMemcpy2DAsync(dst, row_bytes, src, src_pitch, row_bytes, rows,
                               rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))


def new_stream():
    return check(cudart().cudaStreamCreate())


def synchronize(stream) -> None:
    check(cudart().cudaStreamSynchronize(stream))


def stream_handle(stream) -> int:
    """The integer handle execute_async_v3 / set_optimization_profile_async take."""
    return int(stream)
