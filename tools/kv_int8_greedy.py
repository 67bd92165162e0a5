"""Why an int8 KV cache cannot promise float32's greedy text: logit error of int8 cache schemes against the
float32 cache, and the float32 model's own top-2 gaps, on the 5 greedy prompts of tests/test_smollm2.py.

    python tools/kv_int8_greedy.py --fp32 FP32_BUNDLE [--int8 INT8_BUNDLE] [--schemes token static-1.2 ...]
        [--tokens 48] [--out docs/quant/kv_int8_greedy]

Per prompt: the float32 bundle's greedy continuation (`--tokens`, the chat prompt through the chat template,
stopping at its end of turn) and its top-2 logit gap at every step. Per contender: free-running greedy (first
step that differs and float32's gap there) and, teacher-forced on float32's tokens, the largest and median
|logit - float32 logit| and the steps whose top-1 differs. Contenders: `--int8` (a real int8-KV bundle, through
the runtime as it ships) and simulated schemes on the float32 bundle: after every step (the prompt fed token by
token) each new cache position is replaced by its int8 round trip (so the current token attends to its own
exact key/value; the fused int8 kernel attends to its quantized one, a small difference):

- `static-M`: GroupQueryAttention's static per-channel scales (`M` x max |x| on the calibration text, the
  exporter's own `kv_cache.calibration_absmax`); `static-K-M` / `static-V-M`: only keys / only values
  quantized that way (the other exact), to see which error dominates; `static-rest-M`: the same without the first position of each
  story (clips the first token's outliers); `static-p99.9-M`: the 99.9th percentile instead of the max;
- `token`: a scale per token and KV head (absmax / 127), what the fused kernel cannot do; `token-K` / `token-V`:
  only keys / only values quantized that way; `token-gN`: a scale per token, head and N channels (N=32 on
  SmolLM2: 72 bytes per head and token instead of 256, 0.28x); `fp16`: a float16 cache, for scale.
Prints a table and writes OUT.json and OUT.md. threads=1: run it niced on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

import adainfer.runtime as rt
from adainfer.runtime import conversation

#: tests/test_smollm2.py's GREEDY_PROMPTS and CAPITAL_QUESTION (the last one is a chat)
PROMPTS = ["Once upon a time", "The theory of relativity says that", "def fibonacci(n):",
           "Here are three tips for staying healthy:"]
CHAT = "What is the capital of France?"


def prompt_ids(model) -> list[tuple[str, list[int]]]:
    return [(p, model.tokenizer.encode(p)) for p in PROMPTS] + [(CHAT, conversation.prompt_ids(model, CHAT))]


def greedy(model, ids, tokens: int, stops, quant=None, forced=None):
    """(tokens chosen, logits per step): free-running, or teacher-forced on `forced`; `quant(x, layer, kind)`
    replaces every new cache position (x: (1, heads, 1, dim) float32) by its round trip."""
    m = model.manifest

    def tamper(state):
        for arrays, kind in ((state.keys, "k"), (state.values, "v")):
            for layer in range(m.num_layers):
                a = arrays[layer]
                arrays[layer] = np.concatenate([a[:, :, :-1], quant(np.asarray(a[:, :, -1:]), layer, kind)], axis=2)

    if quant is None:
        state, logits = model.start([ids])
    else:
        state, logits = model.start([ids[:1]])
        tamper(state)
        for token in ids[1:]:
            logits = model.step(state, [token])
            tamper(state)
    chosen, steps = [], []
    for i in range(tokens):
        steps.append(logits[0].copy())
        chosen.append(int(logits[0].argmax()))
        nxt = chosen[-1] if forced is None else forced[i]
        if nxt in stops or (forced is not None and i + 1 == len(forced)):
            break
        logits = model.step(state, [nxt])
        if quant is not None:
            tamper(state)
    state.close()
    return chosen, np.array(steps)


def round_trip(scale):
    return lambda x: (np.clip(np.rint(x / scale), -128, 127) * scale).astype(np.float32)


def static_scheme(k_max, v_max, margin, kinds="kv"):
    ks, vs = (np.maximum(a * margin / 127, 1e-8).astype(np.float32)[:, None, :, None, :] for a in (k_max, v_max))
    return lambda x, layer, kind: round_trip((ks if kind == "k" else vs)[layer])(x) if kind in kinds else x


def token_scheme(kinds="kv", group=None):
    def quant(x, layer, kind):
        if kind not in kinds:
            return x
        g = x.reshape(*x.shape[:-1], -1, group or x.shape[-1])  # channel groups of `group` (default: the head)
        scale = np.maximum(np.abs(g).max(axis=-1, keepdims=True) / 127, 1e-8).astype(np.float32)
        return round_trip(scale)(g).reshape(x.shape)
    return quant


def calibration_stats(bundle: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per (layer, kv head, channel) of keys and values on the exporter's calibration text (with and without BOS):
    max |x|, max |x| without each story's first position, 99.9th percentile |x|."""
    from adainfer.exporter.kv_cache import CALIB_STORIES, CALIB_TOKENS
    from adainfer.exporter.quality import held_out_sequences
    from adainfer.paths import DEFAULT_CALIB_DATA

    model = rt.load(bundle, threads=1)
    m = model.manifest
    seqs = held_out_sequences(bundle / "tokenizer.json", m.vocab_size, m.bos_token_id, text=DEFAULT_CALIB_DATA,
                              stories=CALIB_STORIES, max_tokens=CALIB_TOKENS)
    variants = [v for ids in seqs.ids for v in (ids, ids[1:] if ids[:1] == [m.bos_token_id] else [])]
    first, rest = [0.0, 0.0], [[], []]
    for ids in filter(None, variants):
        state, _ = model.start([ids])
        for kind, arrays in enumerate((state.keys, state.values)):
            a = np.abs(np.stack([np.asarray(arrays[layer][0]) for layer in range(m.num_layers)]))  # L, H, T, D
            first[kind] = np.maximum(first[kind], a[:, :, 0])
            rest[kind].append(a[:, :, 1:].astype(np.float16))
    model.close()
    rest = [np.concatenate(r, axis=2).astype(np.float32) for r in rest]
    return {"max": tuple(np.maximum(f, r.max(axis=2)) for f, r in zip(first, rest)),
            "rest": tuple(r.max(axis=2) for r in rest),
            "p99.9": tuple(np.percentile(r, 99.9, axis=2) for r in rest),
            "first_over_rest": tuple(f / np.maximum(r.max(axis=2), 1e-6) for f, r in zip(first, rest))}


def schemes(names, stats):
    out = {}
    for name in names:
        if name == "fp16":
            out[name] = lambda x, layer, kind: x.astype(np.float16).astype(np.float32)
        elif name.startswith("token-g"):
            out[name] = token_scheme("kv", int(name[len("token-g"):]))
        elif name.startswith("token"):
            out[name] = token_scheme({"token": "kv", "token-K": "k", "token-V": "v"}[name])
        elif name.startswith("static-"):
            parts = name.split("-")  # static[-K|-V][-rest|-p99.9]-MARGIN
            kinds = parts.pop(1).lower() if parts[1] in ("K", "V") else "kv"
            which = parts[1] if len(parts) == 3 else "max"
            out[name] = static_scheme(*stats[which], float(parts[-1]), kinds)
        else:
            raise SystemExit(f"unknown scheme {name!r}")
    return out


def compare(reference, toks, logits, forced_logits):
    ref_toks, ref_logits, gaps = reference
    differ = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), None)
    n = min(len(ref_logits), len(forced_logits))
    err = np.abs(forced_logits[:n] - ref_logits[:n]).max(axis=1)
    flips = [i for i in range(n) if int(forced_logits[i].argmax()) != ref_toks[i]]
    return {"identical": differ is None and len(toks) == len(ref_toks), "first_difference": differ,
            "fp32_gap_there": None if differ is None else round(float(gaps[differ]), 4),
            "max_logit_error": round(float(err.max()), 4), "median_logit_error": round(float(np.median(err)), 4),
            "teacher_forced_flips": flips, "fp32_gaps_at_flips": [round(float(gaps[i]), 4) for i in flips]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", type=Path, required=True)
    ap.add_argument("--int8", type=Path)
    ap.add_argument("--schemes", nargs="*", default=["static-1.2", "static-K-1.2", "static-V-1.2", "static-1.0", "static-rest-1.2",
                                                     "static-p99.9-1.1", "token", "token-g32", "token-K", "token-V", "fp16"])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("docs/quant/kv_int8_greedy"))
    args = ap.parse_args()

    fp32 = rt.load(args.fp32, threads=1)
    stops = conversation.stop_ids(fp32)
    prompts = prompt_ids(fp32)
    reference = {}
    for name, ids in prompts:
        toks, logits = greedy(fp32, ids, args.tokens, stops)
        top2 = np.sort(logits, axis=1)[:, -2:]
        reference[name] = (toks, logits, top2[:, 1] - top2[:, 0])
    stats = calibration_stats(args.fp32) if any(s.startswith("static") for s in args.schemes) else None
    rows = {}
    if args.int8:
        int8 = rt.load(args.int8, threads=1)
        rows["int8 bundle"] = {name: compare(reference[name], greedy(int8, ids, args.tokens, stops)[0], None,
                                             greedy(int8, ids, args.tokens, stops, forced=reference[name][0])[1])
                               for name, ids in prompts}
        int8.close()
    for scheme, quant in schemes(args.schemes, stats).items():
        rows[scheme] = {name: compare(reference[name], greedy(fp32, ids, args.tokens, stops, quant)[0], None,
                                      greedy(fp32, ids, args.tokens, stops, quant, reference[name][0])[1])
                        for name, ids in prompts}
        print(scheme, sum(r["identical"] for r in rows[scheme].values()), "/ 5 identical", flush=True)

    gaps = {name: {"tokens": len(r[0]), "smallest_gaps": [round(float(g), 4) for g in np.sort(r[2])[:3]],
                   "at_steps": [int(i) for i in np.argsort(r[2])[:3]]} for name, r in reference.items()}
    lines = ["# int8 KV cache vs float32 greedy text, SmolLM2-135M-Instruct (written by `tools/kv_int8_greedy.py`; "
             "discussion: [README.md](README.md#the-int8-kv-cache-adainfer-export---kv-int8))", "",
             "| contender | identical / 5 | max \\|Δlogit\\| (teacher-forced) | median | per prompt: first difference (fp32 gap there) |",
             "|---|---|---|---|---|"]
    for scheme, per in rows.items():
        cells = "; ".join("=" if r["identical"] else f"step {r['first_difference']} ({r['fp32_gap_there']})"
                          for r in per.values())
        lines.append(f"| {scheme} | {sum(r['identical'] for r in per.values())} | "
                     f"{max(r['max_logit_error'] for r in per.values()):.3f} | "
                     f"{np.median([r['median_logit_error'] for r in per.values()]):.3f} | {cells} |")
    lines += ["", "| prompt | fp32 tokens | smallest fp32 top-2 gaps (steps) |", "|---|---|---|"]
    lines += [f"| {name!r} | {g['tokens']} | {g['smallest_gaps']} ({g['at_steps']}) |" for name, g in gaps.items()]
    if stats is not None:
        ratio_k, ratio_v = stats["first_over_rest"]
        lines += ["", "first position's max |x| / the other positions' (calibration text), max over heads and channels, per layer:",
                  f"- keys: {[round(float(r), 2) for r in ratio_k.max(axis=(1, 2))]}",
                  f"- values: {[round(float(r), 2) for r in ratio_v.max(axis=(1, 2))]}"]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"fp32": str(args.fp32), "int8": str(args.int8) if args.int8 else None, "tokens": args.tokens,
         "load_average": os.getloadavg(), "fp32_gaps": gaps, "contenders": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
