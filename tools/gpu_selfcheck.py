#!/usr/bin/env python3
"""One command for a user with an NVIDIA GPU: does adainfer's TensorRT path work here?

    python tools/gpu_selfcheck.py [BUNDLE]

Builds engines for stories260K (BUNDLE, default bundles/stories260K; exported first if missing,
which needs the export extra) at fp32 and fp16 in a temporary copy, then checks against the ONNX
Runtime CPU runtime:
  - last-position logits of a batch of prompts: fp32 within 1e-3, fp16 within 2e-2;
  - greedy generation token for token at fp32 (twice: the second run replays CUDA graphs);
and times a decode step at full depth against forced early exits (the first k blocks, then the
head). Then early exit on the device: the copy is calibrated with a linear classifier (folded
into the exit head; `adainfer calib --variant full-head` on the bundled TinyStories sample),
fp32 engines are rebuilt (with the exit decider), and for a few prompts and thresholds the
exit layer, decisions taken and token of `early_exit.predict` on the GPU must equal the CPU
runtime's, as must the exit layers and tokens of a greedy `--mode early-exit` generation;
decode is timed at full depth against early exit. Prints a table; exits 1 when a check fails,
2 with one line when there is no GPU.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [[1, 403, 407, 261, 378, 267], [1, 9, 30], [1, 403]]
EXIT_PROMPTS = ["Once upon a time", "The little dog was very happy because", "Lily and Tom went to the park. They saw",
                "One day, a girl named Sue"]
THRESHOLD_SHIFTS = (0.0, -1.0, -2.0, -4.0)  # the calibrated threshold, and lower ones that exit earlier
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


def main(argv: list[str]) -> int:
    from adainfer.errors import AdainferError
    from adainfer.runtime.cuda_rt import require_gpu

    try:
        require_gpu()
    except AdainferError as exc:
        print(f"gpu_selfcheck: error: {exc}", file=sys.stderr)
        return 2
    import adainfer.runtime as rt
    from adainfer.engines.build import build_engines
    from adainfer.engines.profiles import BuildOptions
    from adainfer.runtime.cuda_rt import device_info

    source = Path(argv[0]) if argv else ROOT / "bundles" / "stories260K"
    if not (source / "manifest.json").is_file():
        from adainfer.exporter import export
        from adainfer.paths import DEFAULT_MODEL_DIR

        export(DEFAULT_MODEL_DIR, source, progress=False)
    device = device_info()
    print(f"device: {device.gpu} (sm {device.compute_capability}), TensorRT {device.tensorrt}")
    failures, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        shutil.copytree(source, bundle, ignore=shutil.ignore_patterns("engines"))
        cpu = rt.load(bundle)
        reference = cpu.last_logits(PROMPTS)
        greedy = cpu.generate("Once upon a time", max_new_tokens=48).tokens
        prompt_ids = cpu.encode("Once upon a time")
        for precision in ("fp32", "fp16"):
            build_engines(bundle, BuildOptions(precision=precision, max_batch=len(PROMPTS), max_seq=64, max_context=256),
                          log=lambda line: print(f"  {line}"))
            model = rt.load(bundle, backend="tensorrt")
            diff = float(np.abs(model.last_logits(PROMPTS) - reference).max())
            ok = diff <= TOLERANCE[precision]
            rows.append((f"{precision} logits max |diff|", f"{diff:.2e}", f"<= {TOLERANCE[precision]:g}", ok))
            if precision == "fp32":
                for attempt in ("first", "graph replay"):
                    tokens = model.generate("Once upon a time", max_new_tokens=48).tokens
                    same = tokens == greedy
                    rows.append((f"fp32 greedy = CPU ({attempt})", f"{sum(a == b for a, b in zip(tokens, greedy))}/{len(greedy)}",
                                 "all tokens", same))
            model.time_decode(prompt_ids, steps=64)  # warm-up; its repeat captures the decode CUDA graphs
            model.time_decode(prompt_ids, steps=64)
            full = model.time_decode(prompt_ids, steps=64)
            rows.append((f"{precision} decode step, {model.num_layers} blocks", f"{full * 1e3:.3f} ms", "", True))
            for k in range(1, model.num_layers):
                model.time_decode(prompt_ids, steps=64, depth=k)
                t = model.time_decode(prompt_ids, steps=64, depth=k)
                rows.append((f"{precision} decode step, exit after {k}", f"{t * 1e3:.3f} ms", f"{t / full:.2f} x full", True))
            del model
        rows += early_exit_checks(bundle)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'value':>12}  {'target':<14} result")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:>12}  {target:<14} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(name)
    if failures:
        print(f"\nFAILED: {', '.join(failures)}")
        return 1
    print("\nall checks passed")
    return 0


def early_exit_checks(bundle: Path) -> list[tuple[str, str, str, bool]]:
    """Calibrate `bundle` (folded linear classifier), build fp32 engines with the exit decider, and
    compare early-exit decisions and generation on the GPU with the CPU runtime's; time both."""
    import dataclasses
    import time

    import adainfer.runtime as rt
    from adainfer.calib.calibrate import calibrate
    from adainfer.engines.build import build_engines
    from adainfer.engines.profiles import BuildOptions
    from adainfer.paths import DEFAULT_CALIB_DATA
    from adainfer.runtime.device_exit import DeviceDecider
    from adainfer.runtime.early_exit import ExitDecider, load_policy, predict

    rows = []
    calibrate(bundle, DEFAULT_CALIB_DATA, limit=60, progress=False, kinds=("logreg",), variant="full-head")
    build_engines(bundle, BuildOptions(precision="fp32", max_batch=1, max_seq=64, max_context=256),
                  log=lambda line: print(f"  {line}"))
    cpu, model = rt.load(bundle), rt.load(bundle, backend="tensorrt")
    policy = load_policy(cpu)
    same = total = 0
    exits = []
    for shift in THRESHOLD_SHIFTS:
        p = dataclasses.replace(policy, threshold=policy.threshold + shift)
        for prompt in EXIT_PROMPTS:
            ids = cpu.encode(prompt)
            want, got = predict(cpu, ids, ExitDecider(cpu, p)), predict(model, ids, DeviceDecider(p, cpu.num_layers))
            total += 1
            same += (got.exit_layer, got.decisions, got.token) == (want.exit_layer, want.decisions, want.token)
            exits.append(want.exit_layer)
    rows.append(("early exit (predict): GPU = CPU", f"{same}/{total}", f"all; exits {sorted(set(exits))}", same == total))
    low = dataclasses.replace(policy, threshold=policy.threshold - 2.0)  # exits early often on stories260K
    results = {}
    for name, m in (("cpu", cpu), ("gpu", model)):
        results[name] = m.generate("Once upon a time", max_new_tokens=48, mode="early-exit", policy=low)
    a, b = results["cpu"], results["gpu"]
    ok = a.layers_per_token == b.layers_per_token and a.tokens == b.tokens
    rows.append(("early-exit generation: GPU = CPU", f"{sum(x == y for x, y in zip(a.layers_per_token, b.layers_per_token))}/"
                 f"{len(a.layers_per_token)}", "exit layers, tokens", ok))
    timings = {}
    for mode in ("full", "early-exit"):
        model.generate("Once upon a time", max_new_tokens=48, mode=mode, policy=low)  # warm-up (CUDA graphs)
        started = time.perf_counter()
        g = model.generate("Once upon a time", max_new_tokens=48, mode=mode, policy=low)
        timings[mode] = ((time.perf_counter() - started) / max(g.new_tokens, 1), g.mean_layers_per_token)
    full, early = timings["full"], timings["early-exit"]
    rows.append(("fp32 generation, full depth", f"{full[0] * 1e3:.3f} ms", f"{full[1]:.2f} blocks/token", True))
    rows.append(("fp32 generation, early exit", f"{early[0] * 1e3:.3f} ms", f"{early[1]:.2f} blocks/token, "
                 f"{early[0] / full[0]:.2f} x full", True))
    return rows


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
