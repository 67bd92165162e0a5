#!/usr/bin/env python3
"""One command for a user with an NVIDIA GPU: does adainfer's TensorRT path work here?

    python tools/gpu_selfcheck.py [BUNDLE]

Builds engines for stories260K (BUNDLE, default bundles/stories260K; exported first if missing,
which needs the export extra) at fp32 and fp16 in a temporary copy, then checks against the ONNX
Runtime CPU runtime:
  - last-position logits of a batch of prompts: fp32 within 1e-3, fp16 within 2e-2;
  - greedy generation token for token at fp32 (twice: the second run replays CUDA graphs);
and times a decode step at full depth against forced early exits (the first k blocks, then the
head). Prints a table; exits 1 when a check fails, 2 with one line when there is no GPU.
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
