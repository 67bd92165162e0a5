"""Where a decode step's time goes: kernels vs. session-call overhead vs. KV concatenation vs. Python.

    python tools/decode_profile.py BUNDLE [--threads 2] [--tokens 64] [--json docs/bench/decode-profile.json]

1. Greedy decode of `--tokens` tokens after a `--prompt-tokens` prompt through `Model.step`, timing
   every session call (`Model._run` wrapped): per step, the time spent inside ONNX Runtime's `run`
   per graph kind (embed, blocks, heads) and the rest (Python: bookkeeping, sampling, feeds).
2. ONNX Runtime's profiler on one block and the final head, fed decode-shaped inputs (one token, a
   cache of prompt + tokens/2 positions): per op type, kernel time per call; the remainder of a
   run's time is the session-call overhead outside the kernels. Concat is the KV concatenation.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from decode_args import add_decode_args  # noqa: E402

import onnxruntime as ort  # noqa: E402

from adainfer.runtime import load  # noqa: E402
from adainfer.runtime.sessions import session_options  # noqa: E402


def kind_of(graph: str) -> str:
    if graph.startswith("block_") or graph.startswith("span_"):
        return "blocks"
    if graph.endswith("_head"):
        return "heads"
    return graph


def time_steps(model, prompt: list[int], tokens: int) -> dict:
    """Per-step totals and per-graph-kind session time (ms), medians over the steps."""
    per_call: dict[str, float] = defaultdict(float)
    backend = model.backend  # the cpu backend: one `_run` per graph call
    original = backend._run

    def timed(graph, **feeds):
        started = time.perf_counter()
        out = original(graph, **feeds)
        per_call[kind_of(graph)] += time.perf_counter() - started
        return out

    backend._run = timed
    try:
        state, logits = model.start([prompt])
        totals, kinds = [], defaultdict(list)
        token = int(logits[0].argmax())
        for _ in range(tokens):
            per_call.clear()
            started = time.perf_counter()
            logits = model.step(state, [token])
            token = int(logits[0].argmax())
            totals.append(time.perf_counter() - started)
            for k, v in per_call.items():
                kinds[k].append(v)
    finally:
        backend._run = original
    result = {"step_ms": median(totals) * 1e3}
    for k, v in kinds.items():
        result[f"{k}_run_ms"] = median(v) * 1e3
    result["python_ms"] = result["step_ms"] - sum(result[f"{k}_run_ms"] for k in kinds)
    return result


def profile_graph(path: Path, feeds: dict, threads: int, runs: int) -> dict:
    """Kernel time per op type and per-run overhead (ms per call) from ONNX Runtime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "prof")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        for _ in range(5):
            session.run(None, feeds)
        walls = []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, feeds)
            walls.append(time.perf_counter() - started)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels: dict[str, list[float]] = defaultdict(list)
    model_runs = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            kernels[e["args"].get("op_name", "?")].append(e["dur"])
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            model_runs.append(e["dur"])
    calls = len(model_runs)  # warm-up runs included: every run is profiled
    per_op = {op: sum(d) / calls / 1e3 for op, d in kernels.items()}
    kernel_ms = sum(per_op.values())
    run_ms = median(model_runs) / 1e3
    return {"wall_ms": median(walls) * 1e3, "model_run_ms": run_ms, "kernel_ms": kernel_ms,
            "overhead_ms": run_ms - kernel_ms, "binding_ms": median(walls) * 1e3 - run_ms, "ops_per_run": sum(len(d) for d in kernels.values()) / calls,
            "per_op_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def decode_feeds(model, past: int) -> dict:
    m = model.manifest
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((1, m.num_kv_heads, past, m.head_dim)).astype(np.float32)
    return {"hidden_states": rng.standard_normal((1, 1, m.hidden_size)).astype(np.float32),
            "position_ids": np.array([[past]], dtype=np.int64),
            "attention_mask": np.ones((1, past + 1), dtype=np.int64), "past_key": kv, "past_value": kv.copy()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    add_decode_args(p, repeats=None)
    p.add_argument("--runs", type=int, default=200, help="profiled runs per graph")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    model = load(args.bundle, threads=args.threads, check_digests=False)
    m = model.manifest
    prompt = list(np.random.default_rng(1).integers(3, m.vocab_size, size=args.prompt_tokens))
    time_steps(model, prompt, 8)  # warm-up
    steps = time_steps(model, prompt, args.tokens)
    past = args.prompt_tokens + args.tokens // 2
    block = profile_graph(model.bundle.graph_path(m.block_name(0)), decode_feeds(model, past), args.threads, args.runs)
    head = profile_graph(model.bundle.graph_path("final_head"),
                         {"hidden_states": np.zeros((1, m.hidden_size), np.float32)}, args.threads, max(20, args.runs // 10))
    L = m.num_layers
    rows = [
        ("whole decode step (Model.step)", steps["step_ms"]),
        ("  inside session.run: blocks", steps.get("blocks_run_ms", 0.0)),
        ("  inside session.run: heads", steps.get("heads_run_ms", 0.0)),
        ("  inside session.run: embed", steps.get("embed_run_ms", 0.0)),
        ("  Python outside session.run", steps["python_ms"]),
        (f"one block, isolated (x{L}): wall per call", block["wall_ms"]),
        ("  kernels", block["kernel_ms"]),
        ("  inside run, outside kernels (profiled run - kernels)", block["overhead_ms"]),
        ("  Python binding (wall - profiled run)", block["binding_ms"]),
        ("  KV concatenation (Concat kernels)", block["per_op_ms"].get("Concat", 0.0)),
        ("final head, isolated: wall per call", head["wall_ms"]),
        ("  kernels", head["kernel_ms"]),
    ]
    print(f"bundle {args.bundle}, {L} blocks, {args.threads} threads, {args.tokens} tokens after {args.prompt_tokens}; "
          f"load {os.getloadavg()[0]:.2f}")
    print("| where | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")
    print(f"\nblock ops per call: {block['ops_per_run']:.0f}; kernel ms per call by op type:")
    for op, ms in list(block["per_op_ms"].items())[:12]:
        print(f"  {op:34s} {ms:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "threads": args.threads, "tokens": args.tokens,
                                         "prompt_tokens": args.prompt_tokens, "load_average": os.getloadavg(),
                                         "platform": platform.platform(), "onnxruntime": ort.__version__,
                                         "steps": steps, "block": block, "final_head": head}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
