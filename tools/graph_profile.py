"""Whole-model ONNX graphs decoded in plain ONNX Runtime sessions, interleaved, with a per-op profile.

    python tools/graph_profile.py NAME=MODEL.onnx [NAME=MODEL.onnx ...] [--threads 2] [--tokens 64]
        [--prompt-tokens 16] [--repeats 3] [--profile] [--json OUT]

Each MODEL is a decoder in one graph with a KV cache: our `model.onnx` (`exporter/monolithic.py`:
input_ids, position_ids, attention_mask, past_key_NN/past_value_NN) or onnxruntime-genai's builder
output (input_ids, attention_mask, past_key_values.N.key/value). All run with our sessions' options
(`runtime.sessions.session_options`: no spin-waiting, `--threads` intra-op threads), the KV cache fed
back as the outputs gave it (no shared buffer), so the graphs themselves are compared, without
genai's or our runtime around them. Repeats rotate the contenders; medians of decode ms/token.
`--profile` then runs each once more with ONNX Runtime's profiler: kernel ms per decode step by op type.
"""

from __future__ import annotations

import argparse
import json
import os
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

from adainfer.runtime.sessions import session_options  # noqa: E402


class Graph:
    """One decoder graph in one session: prefill, then one-token steps feeding the presents back."""

    def __init__(self, path: Path, threads: int, profile_dir: str | None = None, spinning: bool = False):
        options = session_options(threads)
        if spinning:  # ONNX Runtime's default: idle workers spin (fine for one session, ruinous for many)
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        if profile_dir:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(profile_dir, "prof")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        self.past = [i for i in inputs if i.name.startswith("past")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        config = Path(path).with_name("genai_config.json")  # genai's cache width is symbolic in its graph
        self.head_dim = json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.is_file() else 64

    def _feeds(self, ids: list[int], start: int, past: list) -> dict:
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, start + n), np.int64)}
        if "position_ids" in self.names:
            feeds["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        feeds.update({i.name: p for i, p in zip(self.past, past)})
        return feeds

    def decode(self, prompt: list[int], tokens: int) -> tuple[list[float], list[int]]:
        past = [np.zeros((1, i.shape[1], 0, i.shape[3] if isinstance(i.shape[3], int) else self.head_dim), np.float32)
                for i in self.past]
        out = self.session.run(None, self._feeds(prompt, 0, past))
        token, length, times, produced = int(out[0].reshape(-1, out[0].shape[-1])[-1].argmax()), len(prompt), [], []
        for _ in range(tokens):
            started = time.perf_counter()
            out = self.session.run(None, self._feeds([token], length, out[1:]))
            token = int(out[0].reshape(-1, out[0].shape[-1])[-1].argmax())
            times.append(time.perf_counter() - started)
            produced.append(token)
            length += 1
        return times, produced


def per_op(profile: Path, steps: int) -> dict[str, float]:
    """Kernel ms per decode step by op type (the prefill run excluded by taking the last `steps` runs)."""
    events = json.loads(profile.read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    first = runs[-steps]
    kernels: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            kernels[e["args"].get("op_name", "?")] += e["dur"] / steps / 1e3
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graphs", nargs="+", help="NAME=MODEL.onnx; NAME ending in '+spin': spin-waiting threads")
    add_decode_args(p, repeats=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    named = dict(g.split("=", 1) for g in args.graphs)
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 49152, size=args.prompt_tokens)]
    graphs = {name: Graph(Path(path), args.threads, spinning=name.endswith("+spin")) for name, path in named.items()}
    samples: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, list[int]] = {}
    load = [os.getloadavg()]
    order = list(graphs)
    for r in range(args.repeats + 1):  # the first round warms up
        for name in order[r % len(order):] + order[:r % len(order)]:
            times, tokens[name] = graphs[name].decode(prompt, args.tokens)
            if r:
                samples[name].append(median(times) * 1e3)
    load.append(os.getloadavg())
    result = {"threads": args.threads, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
              "repeats": args.repeats, "load_average": load, "onnxruntime": ort.__version__, "graphs": named,
              "decode_ms": {n: median(s) for n, s in samples.items()}, "samples_ms": samples, "tokens_out": tokens}
    first = order[0]
    print(f"load {load[0][0]:.2f} -> {load[1][0]:.2f}; {args.threads} threads, {args.tokens} tokens after "
          f"{args.prompt_tokens}, {args.repeats} interleaved repeats, medians")
    print("| graph | decode ms/token | ÷ first | same tokens as first |\n|---|---|---|---|")
    for name in order:
        same = sum(a == b for a, b in zip(tokens[name], tokens[first]))
        print(f"| {name} | {result['decode_ms'][name]:.2f} | {result['decode_ms'][name] / result['decode_ms'][first]:.3f} "
              f"| {same}/{args.tokens} |")
    if args.profile:
        del graphs
        result["per_op_ms"] = {}
        for name, path in named.items():
            with tempfile.TemporaryDirectory() as tmp:
                g = Graph(Path(path), args.threads, tmp, spinning=name.endswith("+spin"))
                g.decode(prompt, args.tokens)
                result["per_op_ms"][name] = per_op(Path(g.session.end_profiling()), args.tokens)
        ops = sorted({op for d in result["per_op_ms"].values() for op in d},
                     key=lambda op: -max(d.get(op, 0) for d in result["per_op_ms"].values()))
        print("\nkernel ms per decode step, by op type (profiled run)")
        print("| op | " + " | ".join(named) + " |\n|---|" + "---|" * len(named))
        for op in ops:
            print(f"| {op} | " + " | ".join(f"{result['per_op_ms'][n].get(op, 0):.3f}" for n in named) + " |")
        print("| **sum** | " + " | ".join(f"{sum(result['per_op_ms'][n].values()):.3f}" for n in named) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
