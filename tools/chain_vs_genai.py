"""Our chain against onnxruntime-genai on the same model: decode speed, forced exits, size, peak RSS.

    python tools/chain_vs_genai.py BUNDLE GENAI_DIR --hf HF_DIR [--peer-python PY] [--repeats 5] \\
        [--json docs/bench/chain-vs-genai.json]

e.g. (SmolLM2-135M-Instruct, fp32):

    python tools/chain_vs_genai.py bundles/smollm2-fp32 /work/cache/smollm2/genai-fp32 \\
        --hf /work/cache/smollm2/hf --peer-python /work/cache/peers-venv/bin/python

One process holds our chain; onnxruntime-genai runs in a peer process (tools/genai_peer.py, under
the peers' Python) that idles while we run. Each repeat times, in a rotated order: genai decode,
our chain at full depth, and our chain with a forced exit after each of `--exits` blocks (the
blocks above never run; the final head reads the exit's hidden state): `--tokens` greedy tokens
after a `--prompt-tokens` prompt, `--threads` threads each. Reported: medians, and medians of
per-repeat ratios (chain / genai, exit@k / chain full, against the k/L + 0.05 target). Then, in
fresh processes: peak RSS (VmHWM) of `adainfer run BUNDLE PROMPT --max-new-tokens 16` and of
genai generating the same 16 tokens; bundle bytes (every file the manifest lists) against the
model's float32 parameter bytes (its safetensors tensors, the tied matrix once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from adainfer.bench.contenders import EarlyExit  # noqa: E402
from adainfer.paths import HELDOUT_TEXT  # noqa: E402
from adainfer.runtime import load  # noqa: E402
from adainfer.runtime.early_exit import ExitDecider  # noqa: E402
from adainfer.runtime.exit_policy import ExitPolicy  # noqa: E402
from adainfer.runtime.sessions import use_global_thread_pool  # noqa: E402

RSS_SNIPPET = """
import sys
from adainfer.cli import main
code = main(sys.argv[1:])
with open('/proc/self/status') as f:
    peak = [int(l.split()[1]) / 1024 for l in f if l.startswith('VmHWM:')][0]
print('PEAK_MB', peak, file=sys.stderr)
"""


class Peer:
    def __init__(self, python: str, model_dir: Path, threads: int):
        self.proc = subprocess.Popen([python, str(ROOT / "tools" / "genai_peer.py"), str(model_dir),
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.ask_line()

    def ask_line(self, request=None) -> dict:
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the genai peer exited")
        return json.loads(line)

    def decode(self, ids, tokens) -> dict:
        return self.ask_line({"ids": ids, "tokens": tokens})

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def chain_decode(model, ids, tokens) -> tuple[float, list[int]]:
    state, logits = model.start([ids])
    token = int(logits[0].argmax())
    out = [token]
    started = time.perf_counter()
    for _ in range(tokens):
        logits = model.step(state, [token])
        token = int(logits[0].argmax())
        out.append(token)
    return (time.perf_counter() - started) / tokens, out


def exit_decode(contender, ids, tokens) -> float:
    state, token = contender.prefill(ids)
    started = time.perf_counter()
    for _ in range(tokens):
        token = contender.step(state, token)
    return (time.perf_counter() - started) / tokens


def parameter_bytes(hf_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                total += int(np.prod(st.get_slice(name).get_shape(), dtype=np.int64)) * 4
    return total


def bundle_bytes(bundle: Path, manifest) -> int:
    return sum((bundle / spec.file).stat().st_size for spec in manifest.all_files().values()
               if not spec.file.startswith("model.onnx"))


def rss_ours(bundle: Path, prompt: str, threads: int, tokens: int, pool: str) -> float:
    proc = subprocess.run([sys.executable, "-c", RSS_SNIPPET, "run", str(bundle), prompt, "--max-new-tokens",
                           str(tokens), "--threads", str(threads), "--no-stop-at-eos", "--thread-pool", pool],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_MB")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"adainfer run failed: {proc.stderr.strip()[-300:]}")
    return float(lines[-1].split()[1])


def rss_genai(python: str, model_dir: Path, ids: list[int], threads: int, tokens: int) -> float:
    peer = Peer(python, model_dir, threads)
    peer.decode(ids, tokens)
    peak = peer.ask_line({"rss": True})["peak_mb"]
    peer.close()
    return peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("genai", type=Path)
    p.add_argument("--hf", type=Path, required=True, help="the Hugging Face directory both were made from")
    p.add_argument("--peer-python", default="/work/cache/peers-venv/bin/python")
    add_decode_args(p, repeats=5)
    p.add_argument("--exits", default="8,15,22")
    p.add_argument("--rss-tokens", type=int, default=16)
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--global-pool", action="store_true",
                   help="ONNX Runtime's global thread pool (`adainfer run --thread-pool global`) instead of one pool per "
                        "session (the default of the library and of `adainfer run`)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    global_pool = use_global_thread_pool(args.threads) if args.global_pool else False
    model = load(args.bundle, threads=args.threads, check_digests=False)
    m = model.manifest
    text = HELDOUT_TEXT.read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text)[: args.prompt_tokens]
    prompt_text = model.tokenizer.decode(ids)
    exits = [int(k) for k in args.exits.split(",") if k]
    contenders = {f"chain_exit@{k}": EarlyExit(model, ExitDecider(model, ExitPolicy.forced(k)), f"chain_exit@{k}", k)
                  for k in exits}
    peer = Peer(args.peer_python, args.genai, args.threads)

    names = ["genai", "chain_full", *contenders]
    samples: dict[str, list[float]] = {n: [] for n in names}
    agreement = None

    def run_one(name: str) -> float:
        nonlocal agreement
        if name == "genai":
            return peer.decode(ids, args.tokens)["decode_s_per_token"]
        if name == "chain_full":
            seconds, out = chain_decode(model, ids, args.tokens)
            return seconds
        return exit_decode(contenders[name], ids, args.tokens)

    # warm-up, and greedy agreement of the two full-depth decoders
    genai_tokens = peer.decode(ids, args.tokens)["tokens"]
    _, ours = chain_decode(model, ids, args.tokens)
    agreement = sum(a == b for a, b in zip(genai_tokens, ours)) / len(ours)
    first_divergence = next((i for i, (a, b) in enumerate(zip(genai_tokens, ours)) if a != b), None)
    for c in contenders.values():
        exit_decode(c, ids, 8)
    for r in range(args.repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(run_one(name))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {samples[n][-1] * 1e3:.2f}" for n in names)
              + f" ms/token (load {os.getloadavg()[0]:.1f})", flush=True)
    peer.close()

    def ratio(a: str, b: str) -> dict:
        values = [x / y for x, y in zip(samples[a], samples[b])]
        return {"median": median(values), "min": min(values), "max": max(values)}

    L = m.num_layers
    result = {
        "bundle": str(args.bundle), "genai": str(args.genai), "threads": args.threads, "tokens": args.tokens,
        "prompt_tokens": len(ids), "repeats": args.repeats, "global_thread_pool": global_pool, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "decode_s_per_token": samples, "median_ms": {n: median(v) * 1e3 for n, v in samples.items()},
        "chain_over_genai": ratio("chain_full", "genai"),
        "exit_fraction": {k: {**ratio(f"chain_exit@{k}", "chain_full"), "target": k / L + 0.05} for k in exits},
        "greedy_agreement_with_genai": agreement, "first_divergence": first_divergence,
    }
    params = parameter_bytes(args.hf)
    size = bundle_bytes(args.bundle, m)
    result["size"] = {"bundle_bytes": size, "parameter_bytes": params, "ratio": size / params, "target": 1.05}
    if not args.no_rss:
        ours_mb = rss_ours(args.bundle, prompt_text, args.threads, args.rss_tokens,
                           "global" if args.global_pool else "per-session")
        genai_mb = rss_genai(args.peer_python, args.genai, ids, args.threads, args.rss_tokens - 1)  # + its first token
        result["peak_rss_mb"] = {"chain_run": ours_mb, "genai": genai_mb, "ratio": ours_mb / genai_mb, "target": 1.10}

    print(f"\n{m.num_layers} blocks; {args.tokens} tokens after {len(ids)}; {args.threads} threads; "
          f"{args.repeats} interleaved repeats; load {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| contender | decode ms/token (median) |\n|---|---|")
    for n in names:
        print(f"| {n} | {result['median_ms'][n]:.2f} |")
    r = result["chain_over_genai"]
    print(f"\nchain / genai decode: {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}; target <= 1.05)")
    for k, e in result["exit_fraction"].items():
        print(f"exit@{k} / full: {e['median']:.3f} (target <= {e['target']:.3f})")
    s = result["size"]
    print(f"bundle {s['bundle_bytes'] / 1e6:.1f} MB / parameters {s['parameter_bytes'] / 1e6:.1f} MB = {s['ratio']:.3f} (target <= 1.05)")
    if "peak_rss_mb" in result:
        q = result["peak_rss_mb"]
        print(f"peak RSS, {args.rss_tokens} new tokens: adainfer run {q['chain_run']:.0f} MB, genai {q['genai']:.0f} MB "
              f"= {q['ratio']:.3f} (target <= 1.10)")
    print(f"greedy agreement with genai over {args.tokens} tokens: {agreement:.3f} (first divergence: {first_divergence})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
