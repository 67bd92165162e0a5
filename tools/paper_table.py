"""The paper's classification table on a real model: every way of deciding, on evaluation rows
never calibrated on, with the decision's own cost counted and real forwards timed.

    python tools/paper_table.py --bundle BUNDLE [--out out/paper_table] [--calib-rows 400] [--eval-rows 200]

For SST-2 (../shared/data/sst2_dev.tsv) and AG News (../shared/data/ag_news_test.csv), k-shot
prompts, rows in a seeded shuffled order with the labels taking turns (stratified): the first
`--calib-rows` calibrate (70% fit the deciders, 30% pick their thresholds), the next
`--eval-rows` evaluate. Features are collected once per slice; every decider is calibrated as
`adainfer calib` does, written out as the runtime's files (checked against scikit-learn), and
evaluated on the evaluation rows. Time: real forwards of full depth and of every decider on
the same `--timing-rows` evaluation prompts, interleaved prompt by prompt.

Rows: full depth; the paper's method (SVM on gap + top prob of the exit head over the full
vocabulary, and its fixed rule gap >= 0.8); gap + top prob over the label words (label head);
internal classifiers trained on the full model's answer (final) and on gold labels (gold: the
bundle then answers with the probe); hidden-state features only. "chosen" marks what
`adainfer calib --label gold` picks (the cheapest that keeps held-out accuracy within
--max-accuracy-drop of full depth, Wilson lower bound).

Writes OUT.json, OUT.md and OUT_<task>_exit_layers.png, OUT_<task>_tradeoff.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adainfer.calib import calibrate as cal  # noqa: E402
from adainfer.calib.data import load_dataset  # noqa: E402
from adainfer.calib.evaluate import full_depth_decider, time_forwards  # noqa: E402
from adainfer.calib.features import collect, peak_memory_mib  # noqa: E402
from adainfer.calib.simulate import Goal, outcome  # noqa: E402
from adainfer.runtime import load  # noqa: E402
from adainfer.runtime.early_exit import ExitDecider  # noqa: E402
from adainfer.runtime.exit_policy import ExitPolicy  # noqa: E402

# the shared data beside the checkout (a worktree under wt/ finds it one level up)
SHARED = next((d for d in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data") if d.is_dir()),
              ROOT.parent / "shared" / "data")
DEFAULT_SHOTS = {"sst2": 2, "agnews": 1}  # the prompts measured in FIELD-NOTES.md
TASKS = {"sst2": ("SST-2", SHARED / "sst2_dev.tsv"), "agnews": ("AG News", SHARED / "ag_news_test.csv")}


def rule_candidate(setting, held, manifest):
    policy = setting.policy(decision="rule", features=["gap"], threshold=0.8, head="full", name="gap>=0.8")
    point = outcome(held, manifest, policy, held.gap.astype(np.float64), 0.8)
    return cal.Candidate("paper rule gap>=0.8 (full vocabulary)", policy, None, [point], point)


def rows_for_task(model, bundle: Path, task: str, args, scratch: Path) -> dict:
    name, path = TASKS[task]
    manifest = model.manifest
    encode = model.tokenizer.encode
    shots = args.shots if args.shots is not None else DEFAULT_SHOTS[task]
    common = dict(shots=shots, seed=args.seed, max_tokens=manifest.max_positions, stratify=True)
    calib_set = load_dataset(path, task, encode, limit=args.calib_rows, **common)
    eval_set = load_dataset(path, task, encode, skip=args.calib_rows, limit=args.eval_rows, **common)
    heads = cal.scratch_heads(bundle, manifest, calib_set, scratch, rank=0)
    started = time.perf_counter()
    table = collect(model, calib_set, label_head=heads["label"], progress=not args.quiet)
    collected = time.perf_counter() - started
    eval_table = collect(model, eval_set, label_head=heads["label"], progress=not args.quiet)
    train, held = cal.split_by_document(table, args.holdout, args.seed)
    labels = tuple(calib_set.label_token_ids)
    gold = cal.Setting(manifest, "gold", cal.make_goal("gold", held, 0.0, args.max_accuracy_drop, args.margin_z),
                       args.seed, labels)
    final = cal.Setting(manifest, "final", cal.make_goal("final", held, args.target_agreement, 0.0, args.margin_z),
                        args.seed, labels)
    fitted = cal.fit_candidates(train, held, gold, probe_labels=("gold",))
    probes_final = cal.fit_probe_candidate(train, held, final, "final")
    fitting = time.perf_counter() - started - collected
    variants = [*fitted["variants"], probes_final]
    chosen = cal.choose([v for v in fitted["variants"]], gold.goal, "auto")
    paper = max((c for c in fitted["comparison"] if c.name in ("svm-linear/paper", "svm-rbf/paper")),
                key=lambda c: (gold.goal.met(c.chosen), c.chosen.flops_saved))
    paper.name = f"paper: SVM ({paper.fitted.kind}) on gap + top prob, full vocabulary"
    by_prefix = {v.name.split("/")[0]: v for v in variants}
    label_best = max((v for v in variants if v.name.startswith("label-head")), key=lambda c: c.chosen.flops_saved)
    label_best.name = f"gap + top prob over the label words ({label_best.name.split('/')[1]} features, {label_best.fitted.kind})"
    rows = [paper, rule_candidate(gold, held, manifest), label_best, by_prefix["probes-final"],
            by_prefix["probes-gold"], by_prefix["hidden-only"]]
    if chosen not in rows:
        rows.append(chosen)

    # every decider as the runtime's files, timed against full depth on the same evaluation prompts
    deciders, checks = {}, {}
    for i, cand in enumerate(rows):
        out = scratch / f"{task}-{i}"
        out.mkdir()
        policy, _, check = cal.write_decider(cand, heads, out, bundle, manifest, held)
        checks[cand.name] = check
        deciders[cand.name] = ExitDecider(model, policy, root=out)
    timing_rows = np.arange(min(args.timing_rows, len(eval_table.gap)))
    prompts = [eval_set.examples[int(r)].ids for r in timing_rows]
    full = full_depth_decider(model, deciders[rows[0].name].policy, heads["label"])
    timed = time_forwards(model, prompts, deciders, full)

    results = [{"decider": "full depth", "answers_with": "model", "accuracy": float(np.mean(eval_table.final == eval_table.gold)),
                "agreement": 1.0, "flops_saved": 0.0, "flops_saved_excluding_decision": 0.0,
                "mean_exit_layer": float(model.num_layers), "time_early_over_full": 1.0,
                "exit_histogram": [0] * (model.num_layers - 1) + [len(eval_table.gap)]}]
    ids = list(labels)
    for cand in rows:
        o = cal.evaluate_candidate(cand, eval_table, manifest)
        sim_exits, sim_answers = simulated_exits(cand, eval_table, manifest)
        runs = timed["runs"][cand.name]
        results.append({
            "decider": cand.name, "chosen": cand is chosen, "answers_with": "probe" if cand.policy.answer == "probe" else "model",
            **o.to_dict(), "time_early_over_full": timed["seconds"][cand.name] / timed["seconds"]["full"],
            "seconds_early": timed["seconds"][cand.name], "seconds_full": timed["seconds"]["full"],
            "runtime_exits_match": float(np.mean([r[0] == sim_exits[i] for i, r in zip(timing_rows, runs)])),
            "runtime_answers_match": float(np.mean([ids.index(r[1]) == sim_answers[i] if r[1] in ids else False
                                                    for i, r in zip(timing_rows, runs)])),
            "held_out": cand.chosen.to_dict(), "onnx_check": checks[cand.name],
            "calibration_curve": [(c.flops_saved, c.accuracy, c.agreement) for c in cand.curve],
        })
    return {"task": task, "name": name, "shots": shots,
            "rows": {"calibration": len(calib_set.examples), "fit": int(len(train.gap)), "thresholds": int(len(held.gap)),
                     "evaluation": len(eval_set.examples), "timed": len(prompts)},
            "accuracy_full_held_out": float(np.mean(held.final == held.gold)), "goal_gold": gold.goal.__dict__,
            "goal_final": final.goal.__dict__, "seconds": {"features_calibration": collected, "fitting": fitting},
            "results": results}


def simulated_exits(cand, table, manifest):
    """(exit layer, answer index) per evaluation row, as the simulation has them."""
    from adainfer.calib.simulate import CostModel, exit_layers

    policy = cand.policy
    cost = CostModel(manifest, policy)
    if cand.probes is not None:
        conf, per_layer, answers = cal.probe_scores(cand, table)
        exits = exit_layers(conf, per_layer, cost.evaluated)
    else:
        t = table.with_head(cand.table_key)
        scores = cal.score_table(cand.fitted, t) if cand.fitted is not None else t.gap.astype(np.float64)
        exits = exit_layers(scores, policy.threshold, cost.evaluated)
        answers = table.pred
    return exits, answers[np.arange(len(exits)), exits - 1]


def markdown(report: dict) -> str:
    lines = ["| task | decider | answers with | accuracy (gold) | agreement with full | compute saved | saved excl. decisions "
             "| mean exit layer | time early/full | calibration / evaluation rows |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["tasks"]:
        rows = t["rows"]
        split = (f"{rows['calibration']} ({rows['fit']} fit + {rows['thresholds']} thresholds) / {rows['evaluation']} "
                 f"(timed {rows['timed']})")
        for r in t["results"]:
            mark = " **(chosen)**" if r.get("chosen") else ""
            lines.append(f"| {t['name']} | {r['decider']}{mark} | {r['answers_with']} | {r['accuracy']:.3f} | "
                         f"{r['agreement']:.3f} | {100 * r['flops_saved']:+.1f}% | {100 * r['flops_saved_excluding_decision']:+.1f}% | "
                         f"{r['mean_exit_layer']:.2f} | {r['time_early_over_full']:.2f} | {split} |")
    return "\n".join(lines)


def plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for t in report["tasks"]:
        deciders = [r for r in t["results"] if r["decider"] != "full depth"]
        fig, axes = plt.subplots(len(deciders), 1, figsize=(7, 1.6 * len(deciders)), sharex=True)
        for ax, r in zip(np.atleast_1d(axes), deciders):
            hist = r["exit_histogram"]
            ax.bar(range(1, len(hist) + 1), hist)
            ax.set_title(r["decider"][:70], fontsize=7)
            ax.tick_params(labelsize=6)
        np.atleast_1d(axes)[-1].set_xlabel("exit layer (evaluation rows)")
        fig.suptitle(f"{t['name']}: exit layers", fontsize=9)
        fig.tight_layout()
        path = out.with_name(f"{out.name}_{t['task']}_exit_layers.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in deciders:
            curve = sorted((s, a) for s, a, _ in r["calibration_curve"] if a is not None)
            (line,) = ax.plot([100 * s for s, _ in curve], [a for _, a in curve], linewidth=1, marker=".", markersize=2,
                              label=r["decider"][:45])
            ax.scatter([100 * r["flops_saved"]], [r["accuracy"]], marker="*", s=90, zorder=5, color=line.get_color())
        full = t["results"][0]["accuracy"]
        ax.axhline(full, color="grey", linestyle="--", linewidth=1, label="full depth (evaluation rows)")
        ax.set_xlabel("compute saved, % (decisions included)")
        ax.set_ylabel("accuracy (gold)")
        ax.set_title(f"{t['name']}: accuracy vs compute; lines: held-out calibration rows as the threshold moves; "
                     "stars: evaluation rows", fontsize=7)
        ax.legend(fontsize=6, loc="lower left")
        fig.tight_layout()
        path = out.with_name(f"{out.name}_{t['task']}_tradeoff.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def replot(path: Path) -> list[str]:
    """Redraw the PNGs of a finished run from its JSON."""
    path = Path(path)
    return plots(json.loads(path.read_text()), path.with_suffix(""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "paper_table")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--calib-rows", type=int, default=400)
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--timing-rows", type=int, default=40)
    p.add_argument("--shots", type=int, default=None, help="demonstrations per prompt (default: SST-2 2, AG News 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.3)
    p.add_argument("--max-accuracy-drop", type=float, default=0.01)
    p.add_argument("--target-agreement", type=float, default=0.95, help="goal of the probes trained on the model's answer")
    p.add_argument("--margin-z", type=float, default=1.0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    model = load(args.bundle)
    load_before = os.getloadavg()
    started = time.perf_counter()
    tasks = []
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            tasks.append(rows_for_task(model, args.bundle, task, args, Path(scratch)))
            print(f"done: {task}", file=sys.stderr)
    report = {"bundle": str(args.bundle), "command": " ".join(sys.argv), "tasks": tasks,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_start": load_before, "load_average_end": os.getloadavg()},
              "seconds": time.perf_counter() - started, "peak_memory_mib": peak_memory_mib()}
    report["table"] = markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(report, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(report["table"] + "\n")
    print(report["table"])
    print(f"\n{report['seconds']:.0f} s, peak memory {report['peak_memory_mib']:.0f} MiB, load average "
          f"{load_before[0]:.1f} -> {report['machine']['load_average_end'][0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
