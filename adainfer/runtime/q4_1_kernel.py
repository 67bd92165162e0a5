"""The fused Q4_1 kernel: one ONNX Runtime custom op (`adainfer.MatMulQ4_1`, kernels/q4_1_matmul.c) for each
exact Q4_1 projection group of an int4 bundle exported from a GGUF file.

Exported exactly, a Q4_1 group is MatMulNBits on q - 8 plus a float term `blocksum(x) @ (m + 8 d)` (Reshape,
ReduceSum, MatMul, Add: exporter/gguf_grid.py), standard operators any ONNX Runtime runs; on SmolLM2 those
small nodes were 1.7 ms of a ~7 ms token and the whole gap to onnxruntime-genai's int4 (whose grid loses
top-1 agreement: docs/quantization.md). The exporter also writes, for every merged graph (spans, merged kv
fills, the full step) that has such groups, a twin whose groups are each one custom node reading the same
initializers (`twin_file`, listed in the manifest's attachments under `twin_key`). The CPU backend loads the twin
instead where `library()` can be built and run here; elsewhere (other providers, other CPUs, no C compiler,
`ADAINFER_Q4_1_KERNEL=0`) the standard graph runs. The library is compiled with the system C compiler on first
use into the cache directory (`$ADAINFER_CACHE`, else ~/.cache/adainfer), named by the source's digest. The
same library holds `adainfer.HeadRefine` (kernels/head_refine.c): a refined LM head's re-scoring tail in one node,
in the twins of refined bundles' head graphs and merged graphs (`exporter/q4_1_twins.fuse_head_refine`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

KERNELS = Path(__file__).resolve().with_name("kernels")
#: compiled together into one library (q4_1_matmul.c registers every op; ort_ops.h is what they share)
SOURCES = (KERNELS / "q4_1_matmul.c", KERNELS / "head_refine.c")
FAST_FLAGS = ("-mavx2", "-mfma", "-mf16c")
FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")
#: "0" turns the kernel off (the standard graphs run)
ENV = "ADAINFER_Q4_1_KERNEL"
DOMAIN, OP = "adainfer", "MatMulQ4_1"
REFINE_OP = "HeadRefine"  # kernels/head_refine.c: a refined LM head's re-scoring tail

_lock = threading.Lock()
_UNBUILT = object()
_library = _UNBUILT  # the built library, None where it cannot be built; once per process


def twin_key(graph: str) -> str:
    """The manifest `attachments` key of `graph`'s fused twin (`twin_key("")`: every twin's key starts with it)."""
    return f"q4_1_kernel/{graph}"


def twin_file(graph: str, graph_sha256: str) -> str:
    """The twin's file name: it names the digest of the graph it was made from, so a twin left behind by a
    graph that was written again is never used for the new one."""
    return f"{graph}.q4_1.{graph_sha256[:16]}.onnx"


def cpu_is_fast() -> bool:
    """Whether this CPU runs the AVX2/FMA/F16C build (read from /proc/cpuinfo: Linux only; elsewhere no)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= flags


def build(out_dir: Path, fast: bool = True) -> Path:
    """Compile the library into `out_dir` (AVX2/FMA/F16C when `fast`, else plain C); raises on failure."""
    suffix = "" if fast else "-plain"
    library = Path(out_dir) / f"libq4_1_matmul{suffix}.so"
    flags = [*FLAGS, f"-I{KERNELS}", *(FAST_FLAGS if fast else ())]
    subprocess.run([os.environ.get("CC", "cc"), *flags, *map(str, SOURCES), "-o", str(library), "-lm"], check=True,
                   capture_output=True)
    return library


def library() -> Optional[Path]:
    """The AVX2 build, compiled once per source digest into the cache; None where it cannot run here."""
    global _library
    if os.environ.get(ENV, "1") == "0" or not cpu_is_fast():
        return None
    with _lock:
        if _library is _UNBUILT:
            _library = _cached_build()
        return _library


def _cached_build() -> Optional[Path]:
    from ..fetch import default_cache  # the one cache directory of the package

    code = b"".join(path.read_bytes() for path in sorted(KERNELS.glob("*.[ch]")))  # the sources and their headers
    digest = hashlib.sha256(code + " ".join(FLAGS + FAST_FLAGS).encode()).hexdigest()[:16]
    target = default_cache() / "kernels" / f"libq4_1_matmul-{digest}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            os.replace(build(Path(tmp)), target)  # atomic: a concurrent build writes the same bytes
    except (OSError, subprocess.CalledProcessError):
        return None  # no compiler, or an unwritable cache: the standard graphs run
    return target
