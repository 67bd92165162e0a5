#!/usr/bin/env python3
"""Decode speed of the chain with and without spans (and with spinning threads) against onnxruntime-genai.

    python tools/spans_bench.py BUNDLE --genai /work/cache/smollm2/genai-fp32 [--tokens 64] [--repeats 3]
                                [--threads 2] [--peer-python /work/cache/peers-venv/bin/python] [--json OUT]

Contenders, each timed once per repeat in a rotated order (interleaved), after one warm-up each:
`spans` (the runtime's default: the full step, one graph per token, its session's threads spinning while
it runs), `spans-nospin` (the same, no thread spins: `load(..., spinning=False)`), `blocks` and `blocks+spin`
(`load(..., spans=False)`: every block its own session call; both spin while each session runs), and `genai` (onnxruntime-genai in a
peer process, tools/genai_peer.py, with its default spinning threads). Greedy decode of --tokens tokens after a
16-token prompt; decode ms/token excludes the prefill. Prints medians, ratios to genai, the load average
before and after, and writes JSON. Compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from decode_args import add_decode_args  # noqa: E402

import adainfer.runtime as rt  # noqa: E402
from backend_compare import decode_run  # noqa: E402
from chain_vs_genai import Peer as GenaiPeer  # noqa: E402

PROMPT = "Once upon a time there was a little girl named Lily who loved to play outside in the"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--genai", type=Path, default=None)
    p.add_argument("--peer-python", default="/work/cache/peers-venv/bin/python")
    add_decode_args(p, repeats=3, prompt_tokens=False)
    p.add_argument("--contenders", default="spans,spans-nospin,blocks,genai")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    names = args.contenders.split(",")
    load_before = os.getloadavg()
    models = {}
    for name in names:
        if name != "genai":
            spinning = not name.endswith("-nospin")
            models[name] = rt.load(args.bundle, threads=args.threads, spans=name.startswith("spans"), spinning=spinning)
    tokenizer_model = next(iter(models.values()))
    ids = tokenizer_model.encode(PROMPT)[:16]
    peer = GenaiPeer(args.peer_python, args.genai, args.threads) if "genai" in names else None
    results = {n: {"prefill_s": [], "decode_s_per_token": []} for n in names}
    tokens = {}

    def run(name: str) -> tuple[float, float]:
        if name == "genai":
            out = peer.decode(ids, args.tokens)
            tokens[name] = out["tokens"]
            return out["prefill_s"], out["decode_s_per_token"]
        return decode_run(models[name], ids, args.tokens)

    for name in names:  # warm-up
        run(name)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            prefill, decode = run(name)
            results[name]["prefill_s"].append(prefill)
            results[name]["decode_s_per_token"].append(decode)
    load_after = os.getloadavg()
    if peer is not None:
        peer.close()
    base = "genai" if "genai" in names else names[0]
    table = {n: {"decode_ms_per_token": 1000 * median(v["decode_s_per_token"]),
                 "prefill_ms": 1000 * median(v["prefill_s"])} for n, v in results.items()}
    for n in table:
        table[n]["ratio_to_" + base] = table[n]["decode_ms_per_token"] / table[base]["decode_ms_per_token"]
    print(f"bundle {args.bundle}, {len(ids)}-token prompt, {args.tokens} tokens, {args.threads} threads, "
          f"{args.repeats} interleaved repeats; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"| contender | decode ms/token (median) | prefill ms | ratio to {base} |")
    print("|---|---|---|---|")
    for n, row in table.items():
        print(f"| {n} | {row['decode_ms_per_token']:.2f} | {row['prefill_ms']:.1f} | {row['ratio_to_' + base]:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "prompt_tokens": len(ids), "tokens": args.tokens,
                                         "threads": args.threads, "repeats": args.repeats,
                                         "load_before": load_before, "load_after": load_after,
                                         "runs": results, "medians": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
