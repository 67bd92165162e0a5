"""Memory that the I/O-binding and TensorRT backends bind to their graphs by address.

Two kinds with one interface (`alloc`, `copy_2d`, `upload`, `download`, `synchronize`):
`HostMemory` (numpy, so the binding logic runs and is tested on a CPU) and `CudaMemory`
(cuda-python through `cuda_rt`, on a GPU). Every block it hands out starts on a 256-byte
boundary, as TensorRT's `setTensorAddress` requires (and ONNX Runtime's CUDA allocator gives).
`DeviceTensor` is a (pointer, shape, dtype) view of such memory, holding what keeps it alive.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .gpu_errors import EngineError

ALIGNMENT = 256  # bytes: TensorRT's setTensorAddress requirement for device pointers


def check_aligned(ptr: int, what: str) -> int:
    """Refuse, in one line, an address TensorRT would reject (not a multiple of 256 bytes)."""
    if ptr % ALIGNMENT:
        raise EngineError(f"{what}: address {ptr:#x} is not {ALIGNMENT}-byte aligned (TensorRT requires it)")
    return ptr


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of the alignment (offsets of blocks packed in one buffer)."""
    return -(-int(nbytes) // ALIGNMENT) * ALIGNMENT


class HostBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self._raw = np.empty(self.nbytes + ALIGNMENT, dtype=np.uint8)
        start = (-self._raw.ctypes.data) % ALIGNMENT
        self.array = self._raw[start:start + self.nbytes]
        self.ptr = self.array.ctypes.data

    def free(self) -> None:
        self.array = self._raw = None
        self.ptr = 0


class HostMemory:
    """Numpy memory: what ONNX Runtime binds as device "cpu"."""

    device = "cpu"
    device_id = 0

    def alloc(self, nbytes: int) -> HostBuffer:
        return HostBuffer(nbytes)

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int) -> None:
        """`rows` rows of `width` bytes, `src_pitch` apart at `src`, to `dst_pitch` apart at `dst`
        (cudaMemcpy2D's contract; a contiguous copy when both pitches equal `width`)."""
        if width == src_pitch == dst_pitch:
            ctypes.memmove(dst, src, width * rows)
            return
        for r in range(rows):
            ctypes.memmove(dst + r * dst_pitch, src + r * src_pitch, width)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)

    def download(self, ptr: int, out: np.ndarray) -> np.ndarray:
        ctypes.memmove(out.ctypes.data, ptr, out.nbytes)
        return out

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


class CudaMemory:
    """cudaMalloc'd memory and one CUDA stream, through cuda-python (`cuda_rt`). `synchronous`: wait
    for every copy (ONNX Runtime runs its graphs on streams of its own, so a copy it reads next must
    have finished; TensorRT runs on this stream, which orders them)."""

    device = "cuda"

    def __init__(self, device_id: int = 0, synchronous: bool = False):
        from . import cuda_rt

        self._rt = cuda_rt
        self.device_id, self.synchronous = device_id, synchronous
        cuda_rt.require_gpu(need_tensorrt=False)
        cuda_rt.set_device(device_id)
        self.cuda_stream = cuda_rt.new_stream()

    def alloc(self, nbytes: int):
        return self._rt.DeviceBuffer(nbytes)  # cudaMalloc: 256-byte aligned

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int) -> None:
        self._rt.copy_2d(dst, dst_pitch, src, src_pitch, width, rows, self.cuda_stream)
        if self.synchronous:
            self._rt.synchronize(self.cuda_stream)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        self._rt.upload(ptr, np.ascontiguousarray(array), self.cuda_stream)

    def download(self, ptr: int, out: np.ndarray) -> np.ndarray:
        self._rt.download(ptr, out, self.cuda_stream)
        self._rt.synchronize(self.cuda_stream)
        return out

    def synchronize(self) -> None:
        self._rt.synchronize(self.cuda_stream)

    def close(self) -> None:
        if self.cuda_stream is not None:
            self._rt.destroy_stream(self.cuda_stream)
            self.cuda_stream = None


@dataclass
class DeviceTensor:
    """A tensor at `ptr` in a backend's memory (host or device); `keep` holds what owns the memory."""

    ptr: int
    shape: tuple
    dtype: np.dtype
    keep: Optional[Any] = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
