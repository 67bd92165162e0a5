"""A bundle's graphs chained by a bare decode loop outside `adainfer.runtime`: what the runtime's levers are worth.

    python tools/chain_drive.py BUNDLE [BUNDLE ...] [--modes per-session,global-spin,...] [--repeats 3]
        [--threads 2] [--tokens 64] [--prompt-tokens 16] [--exits 8,15,22] [--json OUT]

Measures decode ms/token of embed -> blocks -> final_head, greedy, with the sessions set up as:

- `per-session`: one intra-op pool per session, no spin-waiting (what the runtime does today);
- `global-nospin` / `global-spin`: ONNX Runtime's process-wide pool (`set_global_thread_pool_sizes`),
  workers sleeping / spinning between kernels (ONNX Runtime's default, what onnxruntime-genai gets);
- `+iobind` (suffix): `run_with_iobinding`, each block's presents kept as ORT values and bound as the
  next step's past (no numpy round trip), hidden states passed as ORT values between blocks;
- `+spanN` (suffix): blocks merged N at a time into span graphs (`exporter/spans.py`, written into the
  bundle directory as `span_FF_LL.onnx` when missing): L/N session calls instead of L.

A thread-pool choice is per process, so every (bundle, mode) runs in its own worker process; repeats
rotate them, a worker loads once and decodes once per repeat (interleaved). `--exits` also times
forced exits (the first k blocks, then the final head) in each worker. Prints a table, writes JSON.
No part of the runtime is used: this measures what the runtime could gain, for the runtime's owners.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from decode_args import add_decode_args  # noqa: E402


def worker(bundle: Path, mode: str, threads: int, tokens: int, prompt_tokens: int, exits: list[int]) -> None:
    """Load once, then on every stdin line decode once per depth and print the ms/token as JSON."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    if bundle.suffix == ".onnx":  # a whole-model graph (genai's model.onnx, our model.onnx): tools/graph_profile.py
        from graph_profile import Graph

        graph = Graph(bundle, threads, spinning=mode == "spin")
        prompt = [int(t) for t in np.random.default_rng(1).integers(3, 49152, size=prompt_tokens)]
        graph.decode(prompt, tokens)
        print("ready", flush=True)
        for _ in sys.stdin:
            print(json.dumps({"full": median(graph.decode(prompt, tokens)[0]) * 1e3}), flush=True)
        return

    base, iobind = mode.split("+")[0], "+iobind" in mode
    span = int(mode.split("+span")[1]) if "+span" in mode else 1
    if base.startswith("global"):
        _pybind_state.set_global_thread_pool_sizes(threads, 1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    layers = manifest["num_layers"]

    def options():
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.log_severity_level = 3
        spin = "1" if base == "global-spin" else "0"
        o.add_session_config_entry("session.intra_op.allow_spinning", spin)
        o.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if base.startswith("global"):
            o.use_per_session_threads = False
        else:
            o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
        return o

    def session(name):
        return ort.InferenceSession(str(bundle / manifest["graphs"][name]["file"]), options(),
                                    providers=["CPUExecutionProvider"])

    embed, head = session("embed"), session("final_head")
    if span > 1:
        from adainfer.exporter.spans import merge_blocks, span_name

        groups = [list(range(i, min(i + span, layers))) for i in range(0, layers, span)]
        blocks = []
        for g in groups:
            name = span_name(g[0], g[-1]) + ".onnx"
            if not (bundle / name).is_file():
                merge_blocks(bundle, [manifest["graphs"][f"block_{i:02d}"]["file"] for i in g], g[0], name)
            blocks.append(ort.InferenceSession(str(bundle / name), options(), providers=["CPUExecutionProvider"]))
    else:
        groups = [[i] for i in range(layers)]
        blocks = [session(f"block_{i:02d}") for i in range(layers)]
    kv_heads, head_dim = manifest["num_kv_heads"], manifest["head_dim"]
    embed_inputs = {i.name for i in embed.get_inputs()}
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, manifest["vocab_size"], size=prompt_tokens)]

    def forward_numpy(ids, start, past, depth):
        n = len(ids)
        pos = np.arange(start, start + n, dtype=np.int64)[None]
        feeds = {"input_ids": np.asarray([ids], np.int64)}
        if "position_ids" in embed_inputs:
            feeds["position_ids"] = pos
        (hidden,) = embed.run(None, feeds)
        mask = np.ones((1, start + n), np.int64)
        if span > 1:
            for g, sess in zip(groups, blocks):
                if g[-1] >= depth:
                    break  # spans: depths at span boundaries only
                feeds = {"hidden_states": hidden, "position_ids": pos, "attention_mask": mask}
                for i in g:
                    feeds[f"past_key_{i:02d}"], feeds[f"past_value_{i:02d}"] = past[i]
                out = sess.run(None, feeds)
                hidden = out[0]
                for j, i in enumerate(g):
                    past[i] = [out[1 + 2 * j], out[2 + 2 * j]]
            (logits,) = head.run(None, {"hidden_states": np.ascontiguousarray(hidden[:, -1, :])})
            return int(logits[0].argmax())
        for i in range(depth):
            hidden, past[i][0], past[i][1] = blocks[i].run(None, {
                "hidden_states": hidden, "position_ids": pos, "attention_mask": mask,
                "past_key": past[i][0], "past_value": past[i][1]})
        (logits,) = head.run(None, {"hidden_states": np.ascontiguousarray(hidden[:, -1, :])})
        return int(logits[0].argmax())

    bindings = [b.io_binding() for b in blocks]
    head_binding = head.io_binding()

    def forward_iobind(ids, start, past, depth):
        n = len(ids)
        pos = ort.OrtValue.ortvalue_from_numpy(np.arange(start, start + n, dtype=np.int64)[None])
        feeds = {"input_ids": np.asarray([ids], np.int64)}
        if "position_ids" in embed_inputs:
            feeds["position_ids"] = pos.numpy()
        (hidden,) = embed.run(None, feeds)
        hidden = ort.OrtValue.ortvalue_from_numpy(hidden)
        mask = ort.OrtValue.ortvalue_from_numpy(np.ones((1, start + n), np.int64))
        for i in range(depth):
            b = bindings[i]
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            b.bind_ortvalue_input("hidden_states", hidden)
            b.bind_ortvalue_input("position_ids", pos)
            b.bind_ortvalue_input("attention_mask", mask)
            b.bind_ortvalue_input("past_key", past[i][0])
            b.bind_ortvalue_input("past_value", past[i][1])
            for out in ("hidden_states_out", "present_key", "present_value"):
                b.bind_output(out, "cpu")
            blocks[i].run_with_iobinding(b)
            hidden, past[i][0], past[i][1] = b.get_outputs()
        last = hidden.numpy()[:, -1, :]
        head_binding.clear_binding_inputs()
        head_binding.clear_binding_outputs()
        head_binding.bind_cpu_input("hidden_states", np.ascontiguousarray(last))
        head_binding.bind_output("logits", "cpu")
        head.run_with_iobinding(head_binding)
        return int(head_binding.get_outputs()[0].numpy()[0].argmax())

    forward = forward_iobind if iobind else forward_numpy

    def empty():
        z = np.zeros((1, kv_heads, 0, head_dim), np.float32)
        return ort.OrtValue.ortvalue_from_numpy(z) if iobind else z

    def decode(depth):
        past = [[empty(), empty()] for _ in range(layers)]
        token, length, times = forward(prompt, 0, past, depth), len(prompt), []
        for _ in range(tokens):
            started = time.perf_counter()
            token = forward([token], length, past, depth)
            times.append(time.perf_counter() - started)
            length += 1
        return median(times) * 1e3

    decode(layers)  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        result = {"full": decode(layers)}
        for k in exits if span == 1 else []:
            result[str(k)] = decode(k)
        print(json.dumps(result), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", type=Path, help="bundle directories, or whole-model .onnx graphs")
    p.add_argument("--modes", default="per-session,global-nospin,global-spin,per-session+iobind,global-spin+iobind",
                   help="for bundles (see above); a .onnx graph runs once per mode as 'spin' if the mode says spin, "
                        "else without spinning")
    add_decode_args(p, repeats=3)
    p.add_argument("--exits", default="")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    exits = [int(k) for k in args.exits.split(",") if k]
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1], args.threads, args.tokens, args.prompt_tokens, exits)
        return 0
    modes = args.modes.split(",")
    keys = [(b, m) for b in args.bundles if b.suffix != ".onnx" for m in modes]
    for b in [b for b in args.bundles if b.suffix == ".onnx"]:
        keys += [(b, m) for m in dict.fromkeys("spin" if "spin" in m and "nospin" not in m else "nospin" for m in modes)]
    procs = {}
    for b, m in keys:  # load one at a time (peak memory), then all idle while another decodes
        proc = subprocess.Popen([sys.executable, __file__, "--worker", str(b), m, "--threads", str(args.threads),
                                 "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens),
                                 "--exits", args.exits], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        procs[(b, m)] = proc
    load = [os.getloadavg()]
    label = {(b, m): f"{b.parent.name if b.suffix == '.onnx' else b.name}:{m}" for b, m in keys}
    samples: dict = {label[k]: [] for k in keys}
    for r in range(args.repeats):
        for b, m in keys[r % len(keys):] + keys[:r % len(keys)]:
            proc = procs[(b, m)]
            proc.stdin.write("go\n")
            proc.stdin.flush()
            samples[label[(b, m)]].append(json.loads(proc.stdout.readline()))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    load.append(os.getloadavg())
    depths = list(dict.fromkeys(d for v in samples.values() for d in v[0]))
    table = {k: {d: median(s[d] for s in v) for d in v[0]} for k, v in samples.items()}
    first = next(iter(table))
    print(f"load {load[0][0]:.2f} -> {load[1][0]:.2f}; {args.threads} threads, {args.tokens} tokens after "
          f"{args.prompt_tokens}, {args.repeats} interleaved repeats, medians (ms/token)")
    full = "full"
    print("| bundle:mode | " + " | ".join(f"{d} blocks" for d in depths) + f" | full ÷ {first} | "
          + " | ".join(f"exit@{d} ÷ full" for d in depths[1:]) + " |")
    print("|---" * (2 * len(depths) + 1) + "|")
    for k, row in table.items():
        print(f"| {k} | " + " | ".join(f"{row[d]:.2f}" if d in row else "–" for d in depths)
              + f" | {row[full] / table[first][full]:.3f} | "
              + " | ".join(f"{row[d] / row[full]:.3f}" if d in row else "–" for d in depths[1:]) + " |")
    if args.json:
        args.json.write_text(json.dumps({"load_average": load, "threads": args.threads, "tokens": args.tokens,
                                         "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
                                         "median_ms": table, "samples_ms": samples}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
