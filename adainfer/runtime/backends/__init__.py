"""`adainfer.runtime.load(bundle, backend=...)`: one entry point for every backend.

- "cpu" (default; "onnxruntime" is accepted as an older name): ONNX Runtime on the CPU, KV cache in numpy;
- "cpu-iobinding": ONNX Runtime on the CPU with I/O binding (KV cache in preallocated buffers bound by address);
- "ort-cuda" / "ort-trt": ONNX Runtime's CUDA / TensorRT execution providers, I/O binding, KV cache on the GPU;
- "tensorrt": the bundle's TensorRT engines (`adainfer build-engines` on this device first).

Every backend is a `backend.Backend` behind the same `Model` facade. The GPU modules are imported
only when asked for, so this never needs tensorrt, CUDA or torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ...errors import InputError
from ...manifest import check_bundle_path
from ..bundle import open_bundle
from ..limits import check_threads
from ..model import Model
from ..sessions import DEFAULT_PROVIDERS

BACKENDS = ("cpu", "cpu-iobinding", "ort-cuda", "ort-trt", "tensorrt")
ALIASES = {"onnxruntime": "cpu"}


def backend_name(name: str) -> str:
    """The canonical backend name; refuses unknown ones in one line."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return name


def load(bundle_dir, providers: Sequence = DEFAULT_PROVIDERS, threads: Optional[int] = None,
         check_digests: bool = True, backend: str = "cpu", spans: bool = True, spinning: bool = True,
         **options):
    """Load a bundle for inference; `backend` picks the runtime (see the module docstring).
    `spans`: run the bundle's span graphs (several blocks in one graph) where the chain can; False
    runs every block on its own (the ONNX Runtime backends; tensorrt always does); with spans, a bundle's
    full step (embedding, blocks and final head as one graph) runs every full-depth step in one call.
    `spinning`: ONNX Runtime's spin-waiting intra-op threads (cpu backend): True (default) lets every
    session's threads spin while it runs (each pool stops when its run returns), False keeps them asleep
    (spinning costs on a machine with other work: see the README's speed section).
    Options: `max_batch` (ort-trt, tensorrt), `device_id` (ort-cuda, ort-trt)."""
    name = backend_name(backend)
    check_bundle_path(bundle_dir)
    check_threads(threads)
    if name == "cpu":
        if options:
            raise InputError(f"the cpu backend takes no option {sorted(options)[0]!r}")
        from .cpu import CpuBackend

        bundle = open_bundle(bundle_dir, check_digests=check_digests)
        return Model(bundle, CpuBackend(bundle, providers=providers, threads=threads, spans=spans,
                                        spinning=spinning))
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend, require_tensorrt

        require_tensorrt()  # before reading the bundle: no GPU is the commonest refusal
        bundle = open_bundle(bundle_dir, check_digests=check_digests)
        return Model(bundle, TensorRTBackend(bundle, **options))
    from .ort_iobinding import IoBindingBackend

    bundle = open_bundle(bundle_dir, check_digests=check_digests)
    return Model(bundle, IoBindingBackend(bundle, name, threads=threads, spans=spans, **options))
