"""One contender in its own process: `python -m adainfer.bench.worker`, driven over stdin/stdout in JSON lines.

Why a process each: a peer (onnxruntime-genai, llama.cpp) may be importable only in another
interpreter (`--peer-python`), one contender's threads and memory must not disturb another's, and
the process's resident-memory high-water mark (VmHWM) is then that contender's peak RSS. The
parent interleaves the repeats over the workers, so every contender sees the same machine load.

Protocol: the parent writes the spec (see `contenders.build_specs`: one or more contenders that share
one loaded model, e.g. our chain at full depth and its forced exits); the worker answers
`{"ready": true, "baseline_mb": ...}` once imports are done and the contenders are loaded, or
`{"error": ..., "not_installable": bool}`. Then one request per line, naming the contender:
`{"op": "prefill", "name": ..., "ids": [...]}` -> `{"seconds": s}`; `{"op": "decode", "name": ...,
"ids": [...], "tokens": n}` -> `{"seconds": s}` (per token); `{"op": "memory"}` -> `{"peak_mb",
"baseline_mb", "loaded_mb"}`; `{"op": "info", "name": ...}` -> extra fields (exit layers); EOF ends it.
Imports here stay light (no torch), so a peer's interpreter needs only numpy and its own package.
"""

from __future__ import annotations

import json
import sys


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process (Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    baseline = None
    try:
        import numpy  # noqa: F401  (imported before the baseline: every contender needs it)

        if spec["kind"] == "ours":
            import onnxruntime  # noqa: F401
            if "transformers" in spec["names"]:
                import torch  # noqa: F401
                import transformers  # noqa: F401
        if spec.get("thread_pool") == "global":  # before any session exists (runtime/sessions.py)
            from ..runtime.sessions import use_global_thread_pool

            use_global_thread_pool(spec["threads"])
        baseline = _status_mb("VmRSS")
        from .contenders import build_specs
        from .measure import time_decode, time_prefill

        contenders = {c.name: c for c in build_specs(spec)}
    except ImportError as exc:
        _reply({"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__, "not_installable": True})
        return 0
    except Exception as exc:  # a peer failing to load its files: reported as that contender's row
        _reply({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "not_installable": False})
        return 0
    loaded = _status_mb("VmRSS")
    _reply({"ready": True, "baseline_mb": baseline})
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        contender = contenders.get(request.get("name"))
        if op == "prefill":
            _reply({"seconds": time_prefill(contender, request["ids"])})
        elif op == "decode":
            _reply({"seconds": time_decode(contender, request["ids"], request["tokens"])})
        elif op == "memory":
            _reply({"peak_mb": _status_mb("VmHWM"), "baseline_mb": baseline, "loaded_mb": loaded})
        elif op == "info":
            info = {}
            if spec["kind"] == "ours":  # which ONNX Runtime thread pool the process's sessions really use
                from ..runtime.sessions import global_thread_pool

                info["thread_pool"] = "per-session" if global_thread_pool() is None else "global"
            if getattr(contender, "exit_layers", None):
                info["prefill_exit_layers"] = contender.exit_layers[-50:]
            if getattr(contender, "layers_per_token", None):
                info["layers_per_token"] = contender.layers_per_token
            _reply(info)
        else:
            _reply({"error": f"unknown op {op!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
