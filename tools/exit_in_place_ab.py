"""Does appending the cache in place pay for early exits? A/B of the cpu backend with every GroupQueryAttention
graph appending in place (the full step, exit spans, single blocks, kv fills: "after") against only the full step
doing so (the others copying the cache into new arrays every call, as before: "before"). With `--before
layer-fills`: the merged kv fill of an exit's skipped layers (one call) against one kv_fill call per layer.

    python tools/exit_in_place_ab.py BUNDLE [--before copying|layer-fills] [--repeats 5] [--threads 2]
        [--out docs/bench/exit-in-place]

BUNDLE: a fused Llama-layout bundle with the exit spans of the forced exits measured (`adainfer bench` adds them
to its own copy: e.g. its `bench-...-fp32-head8` cache directory). Two worker processes, one per variant ("before"
patches `CpuBackend._run_in_place` to decline every graph but the full step), interleaved repeats, medians of
per-repeat decode ms/token. Cases: full depth; forced exits after k blocks as `adainfer bench` times them (`exit@k`:
the blocks above k never run, no kv fill); early-exit generation (`gen@k`: `EarlyExitDecoder`, each token's kv
fill gives the skipped layers its keys and values); each after a 16-token prompt (64 steps) and a 1,000-token
prompt (16 steps). Prints a table and writes OUT.json / OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = [("full", 16, 64), ("exit@8", 16, 64), ("exit@22", 16, 64), ("gen@8", 16, 64), ("gen@22", 16, 64),
         ("full", 1000, 16), ("exit@8", 1000, 16), ("exit@22", 1000, 16), ("gen@8", 1000, 16), ("gen@22", 1000, 16)]


def worker(bundle: str, variant: str, threads: int, before: str) -> None:
    sys.path.insert(0, str(ROOT))
    import adainfer.runtime as rt
    from adainfer.bench.contenders import Chain, EarlyExit
    from adainfer.runtime.backends import cpu
    from adainfer.runtime.decoding import EarlyExitDecoder, Sampler
    from adainfer.runtime.exit_policy import ExitPolicy

    if variant == "before" and before == "layer-fills":
        cpu.CpuBackend.kv_fill_span = lambda self, *args: False
    elif variant == "before":
        in_place = cpu.CpuBackend._run_in_place

        def only_full_step(self, graph, *args, **kwargs):
            return in_place(self, graph, *args, **kwargs) if graph == self.full_step_graph else None

        cpu.CpuBackend._run_in_place = only_full_step
    model = rt.load(bundle, threads=threads, check_digests=False)
    rng = np.random.default_rng(0)
    for line in sys.stdin:
        name, prompt, steps = line.split()
        ids = [1] + rng.integers(100, 40000, int(prompt) - 1).tolist()
        kind, _, k = name.partition("@")
        if kind == "gen":
            decoder = EarlyExitDecoder(model, Sampler(0.0, 1.0, np.random.default_rng(0)),
                                       model.backend.make_decider(model, ExitPolicy.forced(int(k))))
            state, logits = model.start([ids])
            started = time.perf_counter()
            for _ in range(int(steps)):
                logits, _, _ = decoder.step(state, int(logits[0].argmax()))
        else:
            runner = Chain(model) if kind == "full" else EarlyExit(
                model, model.backend.make_decider(model, ExitPolicy.forced(int(k))), name, int(k))
            state, token = runner.prefill(ids)
            started = time.perf_counter()
            for _ in range(int(steps)):
                token = runner.step(state, token)
        print(json.dumps(1e3 * (time.perf_counter() - started) / int(steps)), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--before", choices=("copying", "layer-fills"), default="copying")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "exit-in-place")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.bundle, args.worker, args.threads, args.before)
        return 0
    load_start = os.getloadavg()
    workers = {v: subprocess.Popen([sys.executable, __file__, args.bundle, "--worker", v, "--threads", str(args.threads),
                                    "--before", args.before],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for v in ("before", "after")}
    samples: dict = {(c, v): [] for c in CASES for v in workers}
    for repeat in range(args.repeats):
        for case in CASES:
            for variant in (("before", "after") if repeat % 2 == 0 else ("after", "before")):
                workers[variant].stdin.write(" ".join(map(str, case)) + "\n")
                workers[variant].stdin.flush()
                samples[(case, variant)].append(json.loads(workers[variant].stdout.readline()))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    rows = []
    for case in CASES:
        name, prompt, steps = case
        med = {v: statistics.median(samples[(case, v)]) for v in workers}
        full = {v: statistics.median(samples[(("full", prompt, steps), v)]) for v in workers}
        rows.append({"case": name, "prompt_tokens": prompt, "steps": steps, **{f"{v}_ms": med[v] for v in workers},
                     **{f"{v}_of_full": med[v] / full[v] for v in workers}, "after_over_before": med["after"] / med["before"],
                     "samples": {v: samples[(case, v)] for v in workers}})
    lines = ["| prompt tokens | case | before: ms/token (÷ full) | after: ms/token (÷ full) | after ÷ before |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['prompt_tokens']} | {r['case']} | {r['before_ms']:.2f} ({r['before_of_full']:.3f}) | "
              f"{r['after_ms']:.2f} ({r['after_of_full']:.3f}) | {r['after_over_before']:.3f} |" for r in rows]
    machine = f"before: {args.before}; {args.repeats} interleaved repeats, {args.threads} threads, load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    table = "\n".join(lines) + f"\n\n{machine}; bundle {Path(args.bundle).name}.\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps({
        "command": "python tools/exit_in_place_ab.py " + " ".join(sys.argv[1:]), "machine": machine,
        "load_average_start": load_start, "load_average_end": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
