"""Compare the ways of deciding an early exit on held-out data: one table, one JSON file.

    python tools/exit_variants.py [--bundle bundles/stories260K] [--json out/exit_variants.json]

For each data set (TinyStories text: calibrated on the bundled calibration sample, evaluated
on the bundled held-out stories; SST-2 and AG News from ../shared/data, split into disjoint
calibration and evaluation rows), each way of deciding is calibrated into a copy of the bundle
and evaluated with `adainfer eval`'s code: agreement with the full model, compute saved with
and without the decision's own cost, and measured time of real forwards (full depth vs early
exit, on the same prompts, interleaved).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adainfer.calib.calibrate import calibrate  # noqa: E402
from adainfer.calib.evaluate import evaluate  # noqa: E402
from adainfer.paths import DEFAULT_CALIB_DATA, HELDOUT_TEXT  # noqa: E402
from adainfer.runtime.exit_policy import ExitPolicy  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
VARIANTS = ["full-head", "head-stride", "hidden-only", "lowrank"]


def datasets(rows: int):
    yield "TinyStories (text)", "text", DEFAULT_CALIB_DATA, HELDOUT_TEXT, {}, {}
    for name, task, file in (("SST-2", "sst2", "sst2_dev.tsv"), ("AG News", "agnews", "ag_news_test.csv")):
        if (SHARED / file).exists():
            # the same shuffled order: calibration on its first rows, evaluation on the rows after them
            yield name, task, SHARED / file, SHARED / file, {"limit": rows, "shots": 1}, {"skip": rows, "limit": rows // 2, "shots": 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "stories260K")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "exit_variants.json")
    p.add_argument("--rows", type=int, default=400, help="classification rows for calibration")
    p.add_argument("--timing-samples", type=int, default=100)
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, task, calib_file, eval_file, calib_opts, eval_opts in datasets(args.rows):
            for variant in VARIANTS:
                bundle = Path(tmp) / f"{task}-{variant}"
                shutil.copytree(args.bundle, bundle)
                report = calibrate(bundle, calib_file, task=task, variant=variant, progress=False, **calib_opts)
                r = evaluate(bundle, eval_file, task=task, timing_samples=args.timing_samples, **eval_opts)
                results.append({"data": name, "variant": report["chosen"]["name"], "classifier": report["chosen"]["classifier"], **r})
                print(f"done: {name} {variant}", file=sys.stderr)
            r = evaluate(args.bundle, eval_file, task=task, timing_samples=args.timing_samples,
                         policy=ExitPolicy.rule(0.8), **eval_opts)
            results.append({"data": name, "variant": "paper rule gap>=0.8", "classifier": "rule", **r})
    table = ["| data | way of deciding | classifier | agreement | accuracy | compute saved | saved excl. decision | mean exit layer | time early/full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        table.append(f"| {r['data']} | {r['variant']} | {r['classifier']} | {r['agreement']:.4f} | {acc} | "
                     f"{100 * r['flops_saved']:+.1f}% | {100 * r['flops_saved_excluding_decision']:+.1f}% | "
                     f"{r['mean_exit_layer']:.2f} | {r['seconds_early_exit'] / r['seconds_full']:.2f} |")
    text = "\n".join(table)
    print(text)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {platform.system()}; "
          f"time = seconds of real early-exit forwards / full-depth forwards on the same prompts")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
