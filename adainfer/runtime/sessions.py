"""ONNX Runtime sessions, one per graph, with options suited to many small graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import onnxruntime as ort

from ..errors import BundleError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def session_options(threads: Optional[int] = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def make_session(path: Path, providers: Sequence = DEFAULT_PROVIDERS, threads: Optional[int] = None) -> ort.InferenceSession:
    available = set(ort.get_available_providers())
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    missing = [n for n in names if n not in available]
    if missing:
        raise BundleError(f"execution provider not available in this onnxruntime: {', '.join(missing)} (available: {', '.join(sorted(available))})")
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
        raise BundleError(f"cannot load {path.name}: {str(exc).splitlines()[0]}") from None
