"""ONNX Runtime sessions, one per graph, each with its own intra-op pool that spins while it runs.

A bundle runs one session per graph (full step, embedding, spans, blocks, heads, kv fills). By
default each has its own intra-op thread pool whose threads spin-wait between the operators of a
run and stop spinning when the run returns (`session_options`), so sessions run one after another
(an early exit: embed, span, head) do not spin against each other; the full step's keep spinning
between runs, since full-depth tokens run it back to back. `use_global_thread_pool` instead makes
every session of the process share ONNX Runtime's global pool, whose workers spin for every graph
(README, SmolLM2 bench, for how it compares); with other jobs on 2 cores the global pool was 2-5x slower
(docs/bench/chain-vs-genai.md). ONNX Runtime fixes the global pool when its environment is created
(the first session of the process) and then refuses sessions with their own pools, so it is a
per-process choice: `adainfer run --thread-pool global`, or `use_global_thread_pool` before
loading anything.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence

import onnxruntime as ort

from ..errors import BundleError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

_pool_lock = threading.Lock()
_global_pool: Optional[int] = None  # intra-op threads of the global pool, once this process uses it (0 = default)
_sessions_made = False  # whether `make_session` has created a session (then the environment exists)


def use_global_thread_pool(threads: Optional[int] = None) -> bool:
    """Share ONNX Runtime's global thread pool (`threads` intra-op threads; None = ONNX Runtime's
    default) between every session this process creates from now on; returns whether it is in
    effect. Call it before any ONNX Runtime session exists in the process: ONNX Runtime silently
    ignores the pool size once its environment exists (then sessions without their own pool would
    run on one thread), so this refuses (False) once `make_session` has run; sessions created
    elsewhere must not precede it either. Afterwards every session must come from `session_options`
    (ONNX Runtime refuses sessions with their own pools)."""
    global _global_pool
    from onnxruntime.capi import _pybind_state

    with _pool_lock:
        if _global_pool is not None:
            return _global_pool == (threads or 0)
        if _sessions_made:
            return False
        _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
        _global_pool = threads or 0
        return True


def global_thread_pool() -> Optional[int]:
    """The global pool's intra-op threads if this process uses it (0 = ONNX Runtime's default), else None."""
    return _global_pool


def session_options(threads: Optional[int] = None, spinning: bool = False, keep_spinning: bool = False) -> ort.SessionOptions:
    """`spinning`: let idle intra-op threads spin-wait (ONNX Runtime's default) instead of sleeping, during a
    run only unless `keep_spinning` (then between runs too, for a session that runs back to back)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # A bundle holds one session per graph, each with its own intra-op thread pool. With ONNX Runtime's
    # default spin-waiting, a pool keeps spinning after its graph returns, against the next session's
    # graph: on a few cores that made a decode step 8x slower (`adainfer bench`). So a spinning pool is
    # told to stop when its run returns (`session.force_spinning_stop`): its threads spin between the
    # operators of one run, where wake-ups cost, and sleep between runs; except `keep_spinning` (the full
    # step: nothing else runs between two full-depth tokens, and waking its threads every token cost).
    # `spinning=False` keeps them asleep throughout, for a machine busy with other work (README,
    # "Spans and the full step").
    spin = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.add_session_config_entry("session.force_spinning_stop", "1" if spinning and not keep_spinning else "0")
    if _global_pool is not None:  # threads come from the process-wide pool
        options.use_per_session_threads = False
    elif threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def light_options() -> ort.SessionOptions:
    """For reading a graph's interface only: no graph optimization, no weight prepacking, one thread."""
    options = session_options(1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def make_session(path: Path, providers: Sequence = DEFAULT_PROVIDERS, threads: Optional[int] = None,
                 light: bool = False, require: Optional[str] = None, spinning: bool = False,
                 keep_spinning: bool = False, custom_ops: Optional[Path] = None) -> ort.InferenceSession:
    """A session for one graph; `light`: only to read its interface (see `light_options`);
    `require`: the execution provider that must actually run it (`check_providers`); `custom_ops`: a library
    of custom operators the graph uses (`q4_1_kernel.library`)."""
    available = set(ort.get_available_providers())
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    missing = [n for n in names if n not in available]
    if missing:
        raise BundleError(f"execution provider not available in this onnxruntime: {', '.join(missing)} (available: {', '.join(sorted(available))})")
    global _sessions_made
    _sessions_made = True
    try:
        options = light_options() if light else session_options(threads, spinning, keep_spinning)
        if custom_ops is not None:
            options.register_custom_ops_library(str(custom_ops))
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
        raise BundleError(f"cannot load {path.name}: {str(exc).splitlines()[0]}") from None
    if require is not None:
        check_providers(session, require, Path(path).name)
    return session


def check_providers(session, wanted: str, what: str) -> None:
    """ONNX Runtime falls back to the next provider, silently, when one fails to initialise (missing
    CUDA, cuDNN or TensorRT libraries): refuse a session where `wanted` is not among those it runs."""
    from .gpu_errors import GpuUnavailableError

    got = list(session.get_providers())
    if wanted not in got:
        raise GpuUnavailableError(f"{what}: ONNX Runtime could not start {wanted} and fell back to "
                                  f"{', '.join(got) or 'nothing'} (check the CUDA / cuDNN / TensorRT libraries it needs)")
