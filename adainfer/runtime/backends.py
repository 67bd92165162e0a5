"""`adainfer.runtime.load(bundle, backend=...)`: one entry point for every backend.

- "onnxruntime" (default): ONNX Runtime on the CPU (numpy + onnxruntime + tokenizers);
- "tensorrt": the bundle's TensorRT engines (`adainfer build-engines` on this device first);
- "ort-cuda" / "ort-trt": ONNX Runtime's CUDA / TensorRT execution providers, KV cache on the GPU.

The GPU modules are imported only when asked for, so this never needs tensorrt, CUDA or torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..errors import InputError
from ..manifest import check_bundle_path
from .sessions import DEFAULT_PROVIDERS

BACKENDS = ("onnxruntime", "tensorrt", "ort-cuda", "ort-trt")


def load(bundle_dir, providers: Sequence = DEFAULT_PROVIDERS, threads: Optional[int] = None,
         check_digests: bool = True, backend: str = "onnxruntime", **options):
    """Load a bundle for inference; `backend` picks the runtime (see the module docstring)."""
    check_bundle_path(bundle_dir)
    if backend == "onnxruntime":
        from .model import load as load_cpu

        return load_cpu(bundle_dir, providers=providers, threads=threads, check_digests=check_digests, **options)
    if backend == "tensorrt":
        from .trt_backend import load_tensorrt

        return load_tensorrt(bundle_dir, check_digests=check_digests, **options)
    if backend in ("ort-cuda", "ort-trt"):
        from .ort_gpu import load_ort_gpu

        return load_ort_gpu(bundle_dir, backend=backend, check_digests=check_digests, threads=threads, **options)
    raise InputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
