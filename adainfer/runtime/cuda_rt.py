"""The few CUDA runtime calls the GPU backends need, through cuda-python (no torch, no pycuda).

Imported lazily: importing this module never needs CUDA; `cudart()` does. cuda-python calls
return a tuple whose first item is the error code (`err, ptr = cudaMalloc(n)`), as in
TensorRT's samples/python/common_runtime.py. Every failure becomes one line: no cuda-python, a
cuda-python outside the supported range, no loadable driver (older cuda-python 12 raises
`RuntimeError: Failed to dlopen libcuda.so.1` at the first call; 12.9 and 13.4 return
`cudaErrorInsufficientDriver` from cudaGetDeviceCount on a machine with no driver at all, seen
here), a driver too old for this cuda-python (also `cudaErrorInsufficientDriver`),
no device (`cudaErrorNoDevice`) are `GpuUnavailableError`; a failed call on a working device is
`CudaError` naming the call and CUDA's error.

Why not Polygraphy (`polygraphy.cuda`: DeviceArray, Stream, memcpy): it would serve, but its
`Cuda()` wrapper loads `libcudart.so*` through ctypes after searching the CUDA toolkit directories
and LD_LIBRARY_PATH (polygraphy 0.53.6, polygraphy/cuda/cuda.py, `Cuda.__init__`), so it needs a
CUDA toolkit or the `nvidia-cuda-runtime-cuXX` wheel beside the driver, where cuda-python's runtime
bindings need only the driver; and what we call is small (malloc, free, 2-D copies, one stream).
Its TensorRT runner hides the execution context's `set_tensor_address`, which binding the KV cache
by address needs. Decision and evidence: docs/jetson.md, "Why not Polygraphy".
"""

from __future__ import annotations

import numpy as np

from .engine_record import DeviceInfo
from .gpu_errors import CudaError, GpuUnavailableError
from .gpu_versions import check_cuda_python, check_tensorrt

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
        except Exception as exc:  # a broken install raises at import
            raise GpuUnavailableError(f"cuda-python cannot be imported ({_first_line(exc)})") from None
        check_cuda_python()
        _CUDART = rt
    return _CUDART


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_name(err) -> str:
    rt = cudart()
    try:
        name = rt.cudaGetErrorName(err)[1]
    except Exception:
        return str(err)
    return name.decode() if isinstance(name, bytes) else str(name)


def check(result, call: str = "CUDA call"):
    """Unwrap a cuda-python call: raise `CudaError` on an error code, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    rt = cudart()
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(f"{call} failed: {error_name(err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def device_count() -> int:
    """CUDA devices visible; 0 when there are none; `GpuUnavailableError` when CUDA itself cannot start."""
    rt = cudart()
    try:
        err, count = rt.cudaGetDeviceCount()
    except RuntimeError as exc:  # cuda-python 12 without a loadable libcuda: "Failed to dlopen libcuda.so.1"
        raise GpuUnavailableError(f"no CUDA driver could be loaded ({_first_line(exc)})") from None
    if err == rt.cudaError_t.cudaSuccess:
        return int(count)
    if err == rt.cudaError_t.cudaErrorNoDevice:
        return 0
    if err == rt.cudaError_t.cudaErrorInsufficientDriver:
        raise GpuUnavailableError("no usable NVIDIA driver (cudaErrorInsufficientDriver: none is installed, or it is older "
                                  "than this cuda-python needs; install cuda-python matching the driver, 12.x for CUDA 12)")
    raise GpuUnavailableError(f"CUDA cannot start: {error_name(err)}")


def device_info(device: int = 0) -> DeviceInfo:
    """GPU name, compute capability and the installed TensorRT version."""
    trt = import_tensorrt()
    prop = check(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(gpu=name.split("\x00")[0].strip(), compute_capability=f"{prop.major}.{prop.minor}",
                      tensorrt=trt.__version__)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise GpuUnavailableError(f"the tensorrt backend needs the tensorrt Python package ({INSTALL_HINT})") from None
    except Exception as exc:  # e.g. its CUDA libraries missing
        raise GpuUnavailableError(f"tensorrt cannot be imported ({_first_line(exc)})") from None
    check_tensorrt(trt)
    return trt


def require_gpu(need_tensorrt: bool = True) -> None:
    """Refuse, in one line, to go on without tensorrt / cuda-python / a CUDA device."""
    if need_tensorrt:
        import_tensorrt()
    if device_count() < 1:
        raise GpuUnavailableError("no CUDA device found (no NVIDIA GPU, or its driver is not loaded)")


class DeviceBuffer:
    """A cudaMalloc'd block (256-byte aligned); `ptr` is the device address TensorRT's set_tensor_address takes."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFree(ptr), "cudaFree")

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


def upload(ptr: int, array: np.ndarray, stream) -> None:
    if array.nbytes:
        rt = cudart()
        check(rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
              "cudaMemcpyAsync (host to device)")


def download(ptr: int, out: np.ndarray, stream) -> np.ndarray:
    if out.nbytes:
        rt = cudart()
        check(rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
              "cudaMemcpyAsync (device to host)")
    return out


def copy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int, stream) -> None:
    """Device-to-device copy of `rows` rows of `width` bytes (cudaMemcpy2DAsync)."""
    if width and rows:
        rt = cudart()
        check(rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream), "cudaMemcpy2DAsync")


def set_device(device: int) -> None:
    check(cudart().cudaSetDevice(device), f"cudaSetDevice({device})")


def new_stream():
    return check(cudart().cudaStreamCreate(), "cudaStreamCreate")


def destroy_stream(stream) -> None:
    check(cudart().cudaStreamDestroy(stream), "cudaStreamDestroy")


def synchronize(stream) -> None:
    check(cudart().cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def stream_handle(stream) -> int:
    """The integer handle execute_async_v3 / set_optimization_profile_async take."""
    return 0 if stream is None else int(stream)
