"""`adainfer calib BUNDLE --data FILE`: train the early-exit classifier and write it into the bundle."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "calib"


def add_data_options(p, generation: bool = False) -> None:
    p.add_argument("--data", type=Path, default=None, help="data file (default: the bundled TinyStories sample)")
    p.add_argument("--task", default="text", choices=["text", "sst2", "agnews"] + (["generation"] if generation else []),
                   help="text: next token at every position; sst2 (TSV) / agnews (CSV): label word at the end"
                        + ("; generation: each generation mode on held-out prompts" if generation else ""))
    p.add_argument("--shots", type=int, default=0, help="demonstrations per prompt (classification)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use at most this many documents / rows")
    p.add_argument("--skip", type=int, default=0, help="skip this many documents / rows (e.g. those calibrated on)")
    p.add_argument("--max-positions-per-doc", type=int, default=None)
    p.add_argument("--stratify", action="store_true",
                   help="classification: labels take turns in the shuffled order (balanced --limit / --skip slices)")


def register(sub) -> None:
    p = sub.add_parser(NAME, help="calibrate the early-exit classifier", description=__doc__)
    p.add_argument("bundle", type=Path)
    add_data_options(p)
    p.add_argument("--label", default="final", choices=["final", "gold"],
                   help="positive when a layer's top-1 equals the full model's (final) or the gold answer (gold)")
    p.add_argument("--target-agreement", type=float, default=0.99, help="--label final: held-out agreement to keep")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01,
                   help="--label gold: held-out accuracy may be at most this far below full depth's")
    p.add_argument("--margin-z", type=float, default=1.0,
                   help="--label gold: the accuracy goal must hold for the lower end of a Wilson interval with this z "
                        "(0: point estimate); --label final goals follow the evidence rule (calib/evidence.py)")
    p.add_argument("--holdout", type=float, default=0.3, help="fraction of documents held out")
    p.add_argument("--rank", type=int, default=None, help="rank of the low-rank exit head (default hidden/4)")
    p.add_argument("--variant", default="auto",
                   choices=["auto", "full-head", "head-stride", "hidden-only", "lowrank", "label-head", "probes"],
                   help="way of deciding to write into the bundle (auto: the cheapest that meets the goal); "
                        "label-head and probes (internal classifiers) are for classification tasks")
    p.add_argument("--reuse-policy", type=Path, default=None, metavar="SRC_BUNDLE",
                   help="do not train: copy SRC_BUNDLE's calibrated exit (e.g. the fp32 export's) into BUNDLE "
                        "(another export of the same model, e.g. int8)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args) -> int:
    from ..calib.calibrate import calibrate
    from ..paths import DEFAULT_CALIB_DATA

    if args.reuse_policy is not None:
        from ..calib.transfer import reuse_policy

        policy = reuse_policy(args.reuse_policy, args.bundle)
        if args.json:
            print(policy.to_json())
        else:
            print(f"reused the exit policy of {args.reuse_policy} in {args.bundle}: {policy.name} "
                  f"({policy.decision}), threshold {policy.threshold:.4g}")
        return 0
    report = calibrate(args.bundle, args.data or DEFAULT_CALIB_DATA, task=args.task, label=args.label,
                       target=args.target_agreement, holdout=args.holdout, seed=args.seed, shots=args.shots,
                       limit=args.limit, skip=args.skip, max_positions_per_doc=args.max_positions_per_doc, rank=args.rank,
                       variant=args.variant, stratify=args.stratify, max_accuracy_drop=args.max_accuracy_drop, margin_z=args.margin_z)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "curves"}, indent=2))
    else:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    goal = report["goal"]
    full = report.get("accuracy_full")
    lines = [f"calibrated on {report['positions']['train']} positions, held out {report['positions']['held_out']}; "
             f"goal: held-out {goal['metric']} >= {goal['value']:.4f} (Wilson lower bound, z={goal['z']:g})"
             + (f"; full-depth accuracy {full:.4f}" if full is not None else ""),
             "| way of deciding | classifier | agreement | accuracy | compute saved | saved excl. decision | mean exit layer |",
             "|---|---|---|---|---|---|---|"]

    def acc(v):
        return f"{v['accuracy']:.4f}" if v.get("accuracy") is not None else "-"

    for v in report["variants"]:
        lines.append(f"| {v['name']} | {v['classifier']} | {v['agreement']:.4f} | {acc(v)} | {100 * v['flops_saved']:+.1f}% | "
                     f"{100 * v['flops_saved_excluding_decision']:+.1f}% | {v['mean_exit_layer']:.2f} |")
    rule = report["paper_rule_gap_0.8"]
    lines.append(f"| paper rule gap >= 0.8 | rule | {rule['agreement']:.4f} | {acc(rule)} | {100 * rule['flops_saved']:+.1f}% | "
                 f"{100 * rule['flops_saved_excluding_decision']:+.1f}% | {rule['mean_exit_layer']:.2f} |")
    c = report["chosen"]
    answers = " (answers with the probe)" if c.get("answer") == "probe" else ""
    lines.append(f"chosen: {c['name']} ({c['classifier']}, decision {c.get('decision')}), threshold {c['threshold']:.4g}"
                 f"{answers}")
    lines.append(f"features {report['seconds']['features']:.1f} s, fitting {report['seconds']['fitting']:.1f} s, "
                 f"peak memory {report['peak_memory_mib']:.0f} MiB")
    return "\n".join(lines)
