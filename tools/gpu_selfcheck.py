#!/usr/bin/env python3
"""One command for a user with an NVIDIA GPU: do adainfer's GPU backends work here?

    python tools/gpu_selfcheck.py [BUNDLE] [--fp16-bundle B] [--int8-bundle B] [--backends tensorrt,ort-cuda,ort-trt]

BUNDLE (default bundles/stories260K) is an exported bundle, for the tensorrt backend with traced
blocks (`adainfer-export --generic-blocks`: TensorRT's parser takes standard operators only). It
needs only the runtime and the gpu extra (no torch, no scikit-learn: the Jetson install of
docs/jetson.md runs it); export on another machine if needed. For each backend that can start
here (tensorrt: engines are built into a temporary copy, max batch 2), every row runs what it
names and compares with the cpu backend:

  logits           a padded batch of 3 prompts, last-position logits (fp32 1e-3, fp16 2e-2);
  teacher-forced   48 decode steps fed the cpu backend's greedy tokens: top-1 agreement
                   (fp32 all, fp16 >= 0.95), which exercises the decode profile / cache;
  batch of 2       8 decode steps of two left-padded rows equal each row decoded alone;
  forced exit      early-exit generation stopping after L/2 blocks: every decoded token did exit
                   there (asserted, not assumed), skipped layers filled, tokens = cpu's;
  calibrated exit  the bundle's exit policy with its threshold lowered: exit layers and tokens =
                   cpu's, and at least one token exited early (else the row FAILS: it tested nothing);
  speculative      ONNX Runtime backends: speculative tokens = full-depth tokens (tensorrt refuses
                   speculative decoding: checked that it refuses in one line);
  fp16 / int8      the same rows on --fp16-bundle (an fp16 export) / --int8-bundle (graphs with Q/DQ
                   nodes); a bundle not given is listed as NOT RUN, never as passed.

Decode timings (full depth against forced exits at L/4, L/2, 3L/4) are printed as measurements,
not checks. Prints the table; exits 0 only when every row that ran passed, 1 when one failed,
2 with one line when no GPU backend can start.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [[1, 403, 407, 261, 378, 267], [1, 9, 30], [1, 403]]
TEXT = "Once upon a time"
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}
AGREEMENT = {"fp32": 1.0, "fp16": 0.95, "int8": 0.8}
BACKENDS = ("tensorrt", "ort-cuda", "ort-trt")


@dataclasses.dataclass
class Row:
    check: str
    value: str
    target: str
    ok: bool


# ---------------------------------------------------------------- rows: (cpu model, model under test) -> Row


def logits_row(cpu, model, precision: str) -> Row:
    diff = float(np.abs(model.last_logits(PROMPTS) - cpu.last_logits(PROMPTS)).max())
    return Row("logits, padded batch of 3", f"{diff:.2e}", f"<= {TOLERANCE[precision]:g}", diff <= TOLERANCE[precision])


def teacher_forced_row(cpu, model, precision: str, steps: int = 48) -> Row:
    tokens = cpu.generate(TEXT, max_new_tokens=steps, stop_at_eos=False).tokens
    state, logits = model.start([cpu.encode(TEXT)])
    agree = 0
    for token in tokens:
        agree += int(logits[0].argmax()) == token
        logits = model.step(state, [token])
    state.close()
    rate = agree / len(tokens)
    return Row(f"teacher-forced decode, {len(tokens)} steps", f"{rate:.3f}", f">= {AGREEMENT[precision]:g} top-1",
               rate >= AGREEMENT[precision] and len(tokens) == steps)


def batch_row(cpu, model, steps: int = 8) -> Row:
    prompts = [PROMPTS[0], PROMPTS[1]]
    state, logits = model.start(prompts)
    alone = [cpu.start([p]) for p in prompts]
    worst = 0.0
    for _ in range(steps):
        tokens = [int(logits[0].argmax()), int(logits[1].argmax())]
        logits = model.step(state, tokens)
        for row, (s, _) in enumerate(alone):
            worst = max(worst, float(np.abs(logits[row] - cpu.step(s, [tokens[row]])[0]).max()))
    return Row(f"batch of 2, {steps} decode steps vs each alone", f"{worst:.2e}", "<= 1e-3", worst <= 1e-3)


def forced_exit_row(cpu, model) -> Row:
    from adainfer.runtime.exit_policy import ExitPolicy

    layer = max(1, cpu.num_layers // 2)
    policy = ExitPolicy.forced(layer)
    want = cpu.generate(TEXT, max_new_tokens=24, mode="early-exit", policy=policy, stop_at_eos=False)
    got = model.generate(TEXT, max_new_tokens=24, mode="early-exit", policy=policy, stop_at_eos=False)
    exited = sum(1 for n in got.layers_per_token[1:] if n == layer)
    ok = exited == len(got.layers_per_token) - 1 > 0 and got.tokens == want.tokens
    return Row(f"forced exit after {layer}: exits, tokens = cpu", f"{exited}/{len(got.layers_per_token) - 1}",
               "every decoded token", ok)


def calibrated_exit_row(cpu, model, shift: float = -2.0):
    """The row, or the reason it cannot run (a string: listed as NOT RUN)."""
    from adainfer.errors import AdainferError
    from adainfer.runtime.early_exit import load_policy

    policy = load_policy(cpu)
    if policy is None:
        return "calibrated exit: the bundle has no exit policy (adainfer calib)"
    low = dataclasses.replace(policy, threshold=policy.threshold + shift)
    want = cpu.generate(TEXT, max_new_tokens=24, mode="early-exit", policy=low, stop_at_eos=False)
    try:
        got = model.generate(TEXT, max_new_tokens=24, mode="early-exit", policy=low, stop_at_eos=False)
    except AdainferError as exc:
        return f"calibrated exit: {exc}"
    exits = sum(1 for n in got.layers_per_token if n < cpu.num_layers)
    same = got.layers_per_token == want.layers_per_token and got.tokens == want.tokens
    return Row(f"calibrated exit ({policy.name}, threshold {shift:+g})", f"{exits} exits",
               "= cpu, >= 1 exit", same and exits > 0)


def speculative_row(cpu, model) -> Row:
    from adainfer.errors import InputError
    from adainfer.runtime.exit_policy import ExitPolicy

    policy = ExitPolicy.forced(max(1, cpu.num_layers // 2))
    full = cpu.generate(TEXT, max_new_tokens=24, stop_at_eos=False).tokens
    if not getattr(model.backend, "multi_token_steps", True):
        try:
            model.generate(TEXT, max_new_tokens=4, mode="speculative", policy=policy)
        except InputError as exc:
            return Row("speculative refused in one line", "refused", "one line", "\n" not in str(exc))
        return Row("speculative refused in one line", "ran", "refused", False)
    got = model.generate(TEXT, max_new_tokens=24, mode="speculative", policy=policy, stop_at_eos=False)
    return Row("speculative = full depth", f"{sum(a == b for a, b in zip(got.tokens, full))}/{len(full)}",
               "all tokens", got.tokens == full)


def rows_for(cpu, model, precision: str) -> tuple[list[Row], list[str]]:
    """The rows that ran, and why the others did not."""
    rows = [logits_row(cpu, model, precision), teacher_forced_row(cpu, model, precision)]
    not_run = []
    if precision == "fp32":
        calibrated = calibrated_exit_row(cpu, model)
        rows += [batch_row(cpu, model), forced_exit_row(cpu, model), speculative_row(cpu, model)]
        if isinstance(calibrated, Row):
            rows.append(calibrated)
        else:
            not_run.append(calibrated)
    return rows, not_run


def timings(model, steps: int = 32) -> list[tuple[str, str]]:
    from adainfer.runtime.exit_policy import ExitPolicy

    out, full = [], None
    for k in [None] + sorted({max(1, model.num_layers * q // 4) for q in (1, 2, 3)}):
        policy = ExitPolicy.forced(k) if k else None
        mode = "early-exit" if k else "full"
        model.generate(TEXT, max_new_tokens=4, mode=mode, policy=policy)  # warm-up
        started = time.perf_counter()
        g = model.generate(TEXT, max_new_tokens=steps, mode=mode, policy=policy, stop_at_eos=False)
        per = (time.perf_counter() - started) / g.new_tokens
        full = full or per
        out.append((f"decode, {'full depth' if k is None else f'forced exit after {k}'}", f"{per * 1e3:.3f} ms/token, "
                    f"{per / full:.2f} x full"))
    return out


# ---------------------------------------------------------------- running it


def start(bundle: Path, backend: str, work: Path):
    """The model on `backend`, or the one-line reason it cannot start here."""
    import adainfer.runtime as rt
    from adainfer.errors import AdainferError

    try:
        if backend == "tensorrt":
            from adainfer.engines.build import build_engines
            from adainfer.runtime import cuda_rt
            from adainfer.runtime.profiles import BuildOptions

            cuda_rt.require_gpu()
            copy = work / f"{bundle.name}-{backend}"
            if not copy.exists():
                shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("engines"))
            build_engines(copy, BuildOptions(max_batch=2, max_seq=64, max_context=256), log=lambda line: print(f"  {line}"))
            return rt.load(copy, backend="tensorrt"), None
        return rt.load(bundle, backend=backend, **({"max_batch": 3} if backend == "ort-trt" else {})), None
    except AdainferError as exc:
        return None, str(exc)


def main(argv=None) -> int:
    import adainfer.runtime as rt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=ROOT / "bundles" / "stories260K")
    parser.add_argument("--fp16-bundle", type=Path, default=None)
    parser.add_argument("--int8-bundle", type=Path, default=None)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args(argv)
    bundles = {"fp32": args.bundle, "fp16": args.fp16_bundle, "int8": args.int8_bundle}
    for precision, path in bundles.items():
        if path is not None and not (path / "manifest.json").is_file():
            print(f"gpu_selfcheck: error: {path} is not a bundle (export one with adainfer-export, on a machine "
                  f"with the export extra if this one has none)", file=sys.stderr)
            return 2
    table, not_run, measured, started_any = [], [], [], False
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for precision, path in bundles.items():
                if path is None:
                    not_run.append(f"{backend} {precision}: no --{precision}-bundle given")
                    continue
                model, reason = start(path, backend, Path(tmp))
                if model is None:
                    not_run.append(f"{backend} {precision}: {reason}")
                    continue
                started_any = True
                cpu = rt.load(path)
                rows, skipped = rows_for(cpu, model, precision)
                table += [(backend, precision, row) for row in rows]
                not_run += [f"{backend} {precision}: {why}" for why in skipped]
                if precision == "fp32":
                    measured += [(backend, *t) for t in timings(model)]
                model.close()
    heavy = [m for m in ("torch", "sklearn", "transformers") if m in sys.modules]
    table.append(("-", "-", Row("imports without torch / scikit-learn", ", ".join(heavy) or "none", "none", not heavy)))
    if not started_any:
        print(f"gpu_selfcheck: error: no GPU backend could start here ({'; '.join(not_run)})", file=sys.stderr)
        return 2
    width = max(len(r.check) for _, _, r in table)
    print(f"\n{'backend':<9} {'prec':<5} {'check':<{width}}  {'value':>14}  {'target':<22} result")
    for backend, precision, r in table:
        print(f"{backend:<9} {precision:<5} {r.check:<{width}}  {r.value:>14}  {r.target:<22} {'ok' if r.ok else 'FAIL'}")
    if measured:
        print("\nmeasurements (not checks):")
        for backend, name, value in measured:
            print(f"  {backend:<9} {name:<32} {value}")
    if not_run:
        print("\nNOT RUN (not passed):\n  " + "\n  ".join(not_run))
    failures = [r.check for _, _, r in table if not r.ok]
    if failures:
        print(f"\nFAILED: {', '.join(failures)}")
        return 1
    print(f"\nall {len(table)} checks that ran passed; {len(not_run)} not run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
