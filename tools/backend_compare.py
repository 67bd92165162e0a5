#!/usr/bin/env python3
"""Decode speed of runtime backends on one bundle, interleaved in one process.

    python tools/backend_compare.py BUNDLE [--backends cpu,cpu-iobinding] [--tokens 64] [--repeats 5]
                                   [--threads 2] [--json OUT]

Each repeat runs every backend once (order rotated), after one warm-up each: a greedy generation
of --tokens tokens after "Once upon a time"; the decode time per token excludes the prefill
(timed separately). Prints medians and each backend's ratio to the first one, with the load
average before and after (compare ratios from one run only), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adainfer.runtime as rt  # noqa: E402


def decode_run(model, ids, tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of one greedy generation."""
    started = time.perf_counter()
    state, logits = model.start([ids])
    prefill = time.perf_counter() - started
    token = int(logits[0].argmax())
    started = time.perf_counter()
    for _ in range(tokens):
        logits = model.step(state, [token])
        token = int(logits[0].argmax())
    per_token = (time.perf_counter() - started) / tokens
    state.close()
    return prefill, per_token


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--backends", default="cpu,cpu-iobinding")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    names = args.backends.split(",")
    load_before = os.getloadavg()
    models = {n: rt.load(args.bundle, backend=n, threads=args.threads) for n in names}
    ids = models[names[0]].encode("Once upon a time")
    for model in models.values():
        decode_run(model, ids, 4)  # warm-up
    samples = {n: {"prefill": [], "decode": []} for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            prefill, decode = decode_run(models[n], ids, args.tokens)
            samples[n]["prefill"].append(prefill)
            samples[n]["decode"].append(decode)
    load_after = os.getloadavg()
    base = median(samples[names[0]]["decode"])
    rows = {n: {"prefill_ms": median(s["prefill"]) * 1e3, "decode_ms_per_token": median(s["decode"]) * 1e3,
                "decode_min_max_ms": [min(s["decode"]) * 1e3, max(s["decode"]) * 1e3],
                "ratio_to_first": median(s["decode"]) / base} for n, s in samples.items()}
    print(f"bundle {args.bundle}, {args.tokens} tokens, {args.repeats} interleaved repeats, {args.threads} threads; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'backend':<16} {'prefill ms':>10} {'decode ms/token':>16} {'min-max':>16} {'÷ ' + names[0]:>10}")
    for n, row in rows.items():
        lo, hi = row["decode_min_max_ms"]
        print(f"{n:<16} {row['prefill_ms']:>10.2f} {row['decode_ms_per_token']:>16.3f} {f'{lo:.2f}-{hi:.2f}':>16} "
              f"{row['ratio_to_first']:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "tokens": args.tokens, "repeats": args.repeats,
                                         "threads": args.threads, "load_average": [load_before, load_after],
                                         "backends": rows, "samples": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
