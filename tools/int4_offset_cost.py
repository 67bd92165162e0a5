#!/usr/bin/env python3
"""What keeping Q4_1 exactly costs an int4 decode step: the full step with and without its offset terms.

    python tools/int4_offset_cost.py INT4_BUNDLE [--genai GENAI_INT4_DIR] [--threads 2] [--repeats 7]
                                     [--past 80] [--json OUT]

An int4 bundle exported from a Q4_1 GGUF re-encodes every projection exactly (`exporter/gguf_grid.py`):
`MatMulNBits` on q - 8 plus a float term `blocksum(x) @ (m + 8 d)` (Reshape, ReduceSum, MatMul, Add per
projection group). This writes a copy of the bundle's `full_step.onnx` with those four nodes removed
(wrong numbers, same weights otherwise: a timing probe only, deleted afterwards), and times one decode
step (past of --past positions, one new token) of both graphs and, if given, onnxruntime-genai's int4
`model.onnx`, in plain ONNX Runtime sessions (--threads intra-op threads, spinning during a run),
interleaved, --repeats rounds of 30 runs each; prints medians and writes JSON. What remains between
"without offsets" and genai is the rest of the graph (rotary, splits, the 8-bit LM head, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import onnx
import onnxruntime as ort

OFFSET_SUFFIXES = ("_gguf_offset", "_blocks", "_block_sums")  # gguf_grid.py's node names
TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def without_offsets(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with every Q4_1 offset term dropped (its Add's output renamed to the MatMulNBits output)."""
    rename, kept, dropped = {}, [], 0
    for node in model.graph.node:
        if node.name.endswith("_add_offset"):
            rename[node.output[0]] = node.input[0]
            dropped += 1
        elif node.name.endswith(OFFSET_SUFFIXES) and node.op_type in ("MatMul", "Reshape", "ReduceSum"):
            dropped += 1
        else:
            kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model, dropped


def decode_feeds(session: ort.InferenceSession, past: int) -> dict:
    """One new token after `past` cached positions, for our full step's or genai's interface."""
    feeds = {}
    for spec in session.get_inputs():
        shape = []
        for dim in spec.shape:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim == "kv_cache_dim":
                shape.append(64)
            elif "past" in str(dim):
                shape.append(past)
            else:
                shape.append(1)
        kind = TYPES[spec.type]
        feeds[spec.name] = np.random.default_rng(0).random(shape).astype(kind) if kind == np.float32 else np.zeros(shape, kind)
    feeds["attention_mask"] = np.ones((1, past + 1), np.int64)
    if "position_ids" in feeds:
        feeds["position_ids"] = np.array([[past]], np.int64)
    feeds["input_ids"] = np.array([[100]], np.int64)
    return feeds


def session(path: Path, threads: int, library: Path | None = None) -> ort.InferenceSession:
    """A plain session (`threads` intra-op threads that stop spinning after each run), with `library`'s custom ops."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(str(path), options)


def arguments(description: str) -> argparse.ArgumentParser:
    """The options this tool and tools/q4_1_fused.py share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("bundle", type=Path, help="an int4 bundle exported from a Q4_1 GGUF")
    p.add_argument("--genai", type=Path, help="onnxruntime-genai's int4 output directory (model.onnx)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--past", type=int, default=80)
    p.add_argument("--json", type=Path)
    return p


def time_steps(sessions: dict, past: int, repeats: int) -> dict[str, list[float]]:
    """ms per decode step of each session: `repeats` interleaved rounds of 30 runs (after 3 warm-up runs)."""
    feeds = {name: decode_feeds(s, past) for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            for _ in range(3):
                s.run(None, feeds[name])
            start = time.perf_counter()
            for _ in range(30):
                s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) / 30 * 1e3)
    return times


def report(args, load: tuple, times: dict, what: str, record: dict) -> None:
    """Print the medians (and each ÷ genai's where it ran) and write --json: `what` heads the table, `record` joins
    the JSON."""
    medians = {name: median(v) for name, v in times.items()}
    print(f"{what}; decode step after {args.past} positions, {args.threads} threads, "
          f"load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    genai = medians.get("onnxruntime-genai int4")
    for name, ms in medians.items():
        print(f"  {name:28s} {ms:6.2f} ms" + (f"  {ms / genai:.3f}x genai" if genai else ""))
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), **record, "past": args.past, "threads": args.threads,
                                         "load_before": load, "load_after": os.getloadavg(), "ms": times,
                                         "median_ms": medians}, indent=2))


def rewritten_full_step(args, rewrite, what: str):
    """The bundle's full step and `rewrite(model) -> (model, count)` of it, as (source, model, count); None after a
    one-line error where there is no full step or the rewrite finds no `what` in it."""
    source = args.bundle / "full_step.onnx"
    if not source.is_file():
        print(f"error: no full_step.onnx in {args.bundle}", file=sys.stderr)
        return None
    model, count = rewrite(onnx.load(str(source), load_external_data=False))
    if not count:
        print(f"error: {source} has no {what} (not an int4 bundle from a Q4_1 GGUF?)", file=sys.stderr)
        return None
    return source, model, count


def main(argv=None) -> int:
    p = arguments(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    found = rewritten_full_step(args, without_offsets, "Q4_1 offset terms")
    if found is None:
        return 2
    source, model, dropped = found
    load = os.getloadavg()
    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=args.bundle) as probe:  # beside its external data
        onnx.save(model, probe.name)
        graphs = {"full step": source, "full step without offsets": Path(probe.name)}
        if args.genai:
            graphs["onnxruntime-genai int4"] = args.genai / "model.onnx"
        sessions = {name: session(path, args.threads) for name, path in graphs.items()}
    times = time_steps(sessions, args.past, args.repeats)
    report(args, load, times, f"{dropped} offset nodes dropped", {"dropped_nodes": dropped})
    return 0


if __name__ == "__main__":
    sys.exit(main())
