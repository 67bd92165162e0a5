"""ONNX Runtime sessions, one per graph, with options suited to many small graphs (no spin-waiting)."""

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
    # A bundle holds one session per graph, each with its own intra-op thread pool. With ONNX
    # Runtime's default spin-waiting, the idle pools of the other graphs keep spinning while one
    # graph runs; on a few cores that made a decode step 8x slower (`adainfer bench`). Sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
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
