"""Quantization on a real model, the Qllm-Eval way (W, WA, KV), and what each does to early exit: one command.

    python tools/quant_study_smollm2.py [--bundle FP32_BUNDLE | --gguf GGUF] [--out docs/quant/smollm2]
        [--variants fp32 fp16 w8a8 w4-b32 w4-b128 kv8 w4-b32+kv8 w8a8+kv8] [--calib-rows 300] [--eval-rows 300]
        [--stories 8] [--articles 8] [--tokens 128] [--repeats 3] [--exit-only] [--replot OUT.json]

On SmolLM2-135M-Instruct (the float32 bundle exported from its Q4_1 GGUF; `--gguf` exports it first).
Every variant is converted from that one float32 bundle: `convert_bundle` for the weights (fp16, int8-dynamic
= W8A8, int4 = W4 MatMulNBits with blocks of 32 or 128, the embedding and heads float32 for every precision (the
classification label head is cut from a float final head); with `verify=False`, so that a precision the export's
quality gate refuses (W8A8 on SmolLM2) is still measured: the table says which the gate refuses, judged on the
study's own TinyStories sample, which is the gate's), and
`convert_kv_bundle` for the int8 KV cache (KV8, before the weights). Measured per variant:

- in a fresh subprocess with the light runtime (numpy + onnxruntime + tokenizers): peak RSS after building a
  2,048-token context (chunked prefill of 256 tokens, so attention scores do not dominate) and at the end;
  perplexity and top-1 agreement with fp32 on `--stories` held-out TinyStories stories
  (adainfer/data/tinystories_heldout.txt) and on `--articles` AG News articles (title + description, the last
  rows of ../shared/data/ag_news_test.csv), teacher forcing, `--tokens` tokens each; prefill ms/token
  (one `--tokens` prompt) and decode ms/token (32 greedy steps), medians of `--repeats`;
- size on disk (whole bundle);
- early exit on SST-2 (2-shot) and AG News (1-shot) as `tools/paper_table.py` and `adainfer calib --label gold`
  do it (rows in a seeded, stratified order; the first `--calib-rows` calibrate: 70% fit, 30% pick thresholds;
  the next `--eval-rows` evaluate, never calibrated on; the same rows for every variant): accuracy at full depth,
  and the exit `adainfer calib` chooses recalibrated on the variant ("recal") and the fp32 bundle's chosen
  exit applied to the variant's own features ("fp32 policy", what `--reuse-policy` does): accuracy,
  compute saved (decisions included), mean exit layer.

Per variant and task the exit table also compares recal and the fp32 policy on the same evaluation rows
(`adainfer.calib.evidence.paired_difference`): recal minus fp32-policy accuracy in points, the rows only one of
them gets right, a 95% interval and the exact McNemar p; "fp32 policy within 1 pt of recal" is yes when the whole
interval lies at or below +1 point, no when it lies above, else undecided (the rows cannot tell); a line per
variant pools both tasks (their rows are disjoint, so the discordant counts add: `paired_counts`).

One run without `--exit-only` writes every column (about an hour on 2 cores with 300 + 300 rows per task);
`--exit-only` measures only the early-exit columns and the size on disk (no perplexity, RSS, timing, quality
plot), for a quicker look at the exit alone.

Writes OUT.json, OUT.md and two plots: OUT_quality_vs_size.png (perplexity ratio to fp32 against bundle size)
and OUT_exit_saving.png (compute saved by the exit per variant), after every variant (a run cut short keeps the
variants it finished). Run it niced on a shared machine; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from adainfer.calib.evidence import paired_counts, paired_difference, within_margin  # noqa: E402
from quant_study import peak_rss_mb  # noqa: E402

SHARED = next((d for d in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data") if d.is_dir()),
              ROOT.parent / "shared" / "data")
AG_NEWS = SHARED / "ag_news_test.csv"
SST2 = SHARED / "sst2_dev.tsv"
#: name -> (precision, MatMulNBits block size, int8 KV cache)
VARIANTS = {"fp32": ("fp32", 32, False), "fp16": ("fp16", 32, False), "w8a8": ("int8-dynamic", 32, False),
            "w4-b32": ("int4", 32, False), "w4-b128": ("int4", 128, False), "kv8": ("fp32", 32, True),
            "w4-b32+kv8": ("int4", 32, True), "w8a8+kv8": ("int8-dynamic", 32, True)}
LABELS = {"fp32": "fp32", "fp16": "fp16", "w8a8": "W8A8 (int8-dynamic)", "w4-b32": "W4 (int4, block 32)",
          "w4-b128": "W4 (int4, block 128)", "kv8": "fp32 + KV8", "w4-b32+kv8": "W4 (block 32) + KV8",
          "w8a8+kv8": "W8A8 + KV8"}
TASKS = {"sst2": ("SST-2", SST2, 2), "agnews": ("AG News", AG_NEWS, 1)}
CONTEXT = 2048
CHUNK = 256
DECODE = 32


# ----------------------------------------------------------------------------- measuring (light subprocess)


def _teacher_forced(model, ids):
    x = np.asarray([ids], dtype=np.int64)
    run = model.run_layers(x, model.new_state(1), np.ones_like(x))
    return model.final_logits(run.hidden[0])[:-1].astype(np.float64)


def _quality(model, sequences, reference):
    nll, count, agree, top1 = 0.0, 0, 0, []
    for i, ids in enumerate(sequences):
        logits = _teacher_forced(model, ids)
        targets = np.asarray(ids[1:])
        shifted = logits - logits.max(-1, keepdims=True)
        nll -= float((shifted[np.arange(len(targets)), targets] - np.log(np.exp(shifted).sum(-1))).sum())
        count += len(targets)
        top1.append(logits.argmax(-1).tolist())
        if reference is not None:
            agree += int((np.asarray(top1[-1]) == np.asarray(reference[i])).sum())
    return {"perplexity": float(np.exp(nll / count)), "tokens": count,
            "top1_agreement": 1.0 if reference is None else agree / count}, top1


def measure_main(bundle: str, request: str, result: str) -> None:
    import adainfer.runtime as rt

    data = json.loads(Path(request).read_text())
    model = rt.load(bundle, threads=data["threads"])
    # a 2,048-token context, prefilled in chunks (batch 1: the fused attention takes several tokens with a cache)
    context = data["context_ids"]
    state = model.new_state(1)
    for start in range(0, len(context), CHUNK):
        chunk = np.asarray([context[start:start + CHUNK]], dtype=np.int64)
        model.run_layers(chunk, state, np.ones_like(chunk))
    row = {"context_tokens": int(state.length), "kv_cache_mb": sum(k.nbytes + v.nbytes for k, v in zip(state.keys, state.values)) / 1e6,
           "peak_rss_2048_mb": peak_rss_mb()}
    del state
    out = {"top1": {}}
    for text, seqs in data["texts"].items():
        q, top1 = _quality(model, seqs, data["reference"].get(text))
        row.update({f"{text}_{k}": v for k, v in q.items()})
        out["top1"][text] = top1
    prompt = [t for ids in data["texts"]["tinystories"] for t in ids][: data["tokens"]]
    prefill, decode = [], []
    for _ in range(data["repeats"]):
        started = time.perf_counter()
        st, logits = model.start([prompt])
        prefill.append((time.perf_counter() - started) / len(prompt))
        started = time.perf_counter()
        for _ in range(DECODE):
            logits = model.step(st, [int(logits[0].argmax())])
        decode.append((time.perf_counter() - started) / DECODE)
    row.update(prefill_ms_per_token=1e3 * statistics.median(prefill), decode_ms_per_token=1e3 * statistics.median(decode),
               peak_rss_mb=peak_rss_mb(), torch_loaded="torch" in sys.modules)
    out["row"] = row
    Path(result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- building the variants


def build_variant(name: str, fp32: Path, work: Path, hf_model, kv_fp32: dict) -> tuple[Path, dict]:
    """The variant's bundle (converted from the fp32 one) and what its export's quality gate says."""
    from adainfer.exporter.convert import convert_bundle
    from adainfer.exporter.kv_cache import convert_kv_bundle

    precision, block, kv = VARIANTS[name]
    if name == "fp32":
        return fp32, {"gate": "passes (reference)"}
    source = fp32
    info = {}
    if kv:
        if "bundle" not in kv_fp32:  # the KV8 conversion (with its own quality gate) is shared by every +KV8 variant
            kv_fp32["bundle"] = work / "kv8"
            manifest = convert_kv_bundle(fp32, kv_fp32["bundle"], model=hf_model, force=True)
            kv_fp32["quality"] = manifest.kv_cache.quality
        source = kv_fp32["bundle"]
        info["kv_gate"] = {k: kv_fp32["quality"][k] for k in ("top1_agreement", "perplexity_ratio")}
        if precision == "fp32":
            return source, {**info, "gate": "passes"}
    out = work / name
    # heads stay float32 for every precision: the label head that answers (and decides) classification is cut
    # from the float final head, so every row compares the blocks' precision alone (label_head can also cut a
    # quantized head since the seventh session; the study's numbers were measured with float heads)
    convert_bundle(hf_model, source, out, precision, block_size=block, quantize_heads=False, force=True, verify=False)
    return out, {**info, "quantize_heads": False}


def gate(precision: str, row: dict, fp32_row: dict) -> str:
    """What the export's quality gate (`quality.check`, held-out TinyStories) says of this variant's weights; the
    study's TinyStories sample is the gate's own (8 stories, 128 tokens) and fp32 equals transformers within 1e-4."""
    from adainfer.errors import ExportError
    from adainfer.exporter import quality

    measured = {"text": "tinystories_heldout.txt", "positions": row["tinystories_tokens"],
                "top1_agreement": row["tinystories_top1_agreement"], "perplexity": row["tinystories_perplexity"],
                "fp32_perplexity": fp32_row["tinystories_perplexity"],
                "perplexity_ratio": row["tinystories_perplexity"] / fp32_row["tinystories_perplexity"]}
    try:
        quality.check(precision, measured)
        return "passes"
    except ExportError as exc:
        return f"refused: {str(exc).split(': ', 1)[-1]}"


def bundle_mb(bundle: Path) -> float:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.is_file()) / 1e6


# ----------------------------------------------------------------------------- early exit (calib's own functions)


def exit_rows(bundle: Path, task: str, args, scratch: Path, fp32_chosen: dict) -> dict:
    """Full-depth accuracy, the recalibrated exit and the fp32 exit on this bundle's evaluation rows."""
    from adainfer.calib import calibrate as cal
    from adainfer.calib.data import load_dataset
    from adainfer.calib.features import collect
    from adainfer.runtime import load

    name, path, shots = TASKS[task]
    model = load(bundle)
    manifest = model.manifest
    common = dict(shots=shots, seed=args.seed, max_tokens=manifest.max_positions, stratify=True)
    calib_set = load_dataset(path, task, model.tokenizer.encode, limit=args.calib_rows, **common)
    eval_set = load_dataset(path, task, model.tokenizer.encode, skip=args.calib_rows, limit=args.eval_rows, **common)
    heads = cal.scratch_heads(bundle, manifest, calib_set, scratch, rank=0)
    table = collect(model, calib_set, label_head=heads["label"], progress=False)
    eval_table = collect(model, eval_set, label_head=heads["label"], progress=False)
    train, held = cal.split_by_document(table, 0.3, args.seed)
    gold = cal.Setting(manifest, "gold", cal.make_goal("gold", held, 0.0, 0.01, 1.0), args.seed,
                       tuple(calib_set.label_token_ids))
    fitted = cal.fit_candidates(train, held, gold, probe_labels=("gold",))
    chosen = cal.choose(fitted["variants"], gold.goal, "auto")  # what `adainfer calib --label gold` writes
    if task not in fp32_chosen:
        fp32_chosen[task] = chosen
    out = {"rows": {"calibration": len(calib_set.examples), "fit": int(len(train.gap)), "thresholds": int(len(held.gap)),
                    "evaluation": len(eval_set.examples)},
           "full_accuracy": float(np.mean(eval_table.final == eval_table.gold))}
    correct = {}
    for how, cand in (("recal", chosen), ("fp32_policy", fp32_chosen[task])):
        result = cal.evaluate_candidate(cand, eval_table, manifest)
        correct[how] = result.answers == eval_table.gold
        o = result.to_dict()
        assert abs(float(np.mean(correct[how])) - o["accuracy"]) < 1e-12  # the per-row answers are the outcome's own
        out[how] = {"decider": cand.name, "answers_with": "probe" if cand.policy.answer == "probe" else "model",
                    **{k: o[k] for k in ("accuracy", "agreement", "flops_saved", "mean_exit_layer")}}
    # recal minus fp32 policy on the same evaluation rows: the rows where they disagree, an interval, McNemar
    out["paired"] = paired_difference(correct["recal"], correct["fp32_policy"])
    out["paired"]["fp32_policy_within_1_point"] = within_margin(out["paired"], 1.0)
    return out


# ----------------------------------------------------------------------------- report


def quality_table(rows: list[dict]) -> list[str]:
    lines = ["| variant | export gate | TinyStories ppl (×fp32) | AG News ppl (×fp32) | top-1 = fp32 (TS / AG) | bundle MB "
             "| KV MB at 2,048 | peak RSS MB at 2,048 / end | prefill ms/token | decode ms/token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {LABELS[r['variant']]} | {r['gate']} | {r['tinystories_perplexity']:.3f} ({r['tinystories_ratio']:.3f}) | "
            f"{r['agnews_perplexity']:.2f} ({r['agnews_ratio']:.3f}) | {r['tinystories_top1_agreement']:.3f} / "
            f"{r['agnews_top1_agreement']:.3f} | {r['bundle_mb']:.0f} | {r['kv_cache_mb']:.1f} | "
            f"{r['peak_rss_2048_mb']:.0f} / {r['peak_rss_mb']:.0f} | {r['prefill_ms_per_token']:.2f} | {r['decode_ms_per_token']:.2f} |")
    return lines


def exit_table(rows: list[dict]) -> list[str]:
    """One line per variant and task; the last columns compare recal and the fp32 policy on the same rows."""
    lines = ["| variant | task | accuracy, full depth | recal: decider | recal: accuracy | recal: saved | recal: mean exit "
             "| fp32 policy: accuracy | fp32 policy: saved | fp32 policy: mean exit | recal − fp32 policy, points [95% CI] "
             "| rows only recal / only fp32 policy right | McNemar p | fp32 policy within 1 pt of recal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for task, (name, _, _) in TASKS.items():
            e = r.get("exit", {}).get(task)
            if e is None:
                continue
            rc, fp, pr = e["recal"], e["fp32_policy"], e["paired"]
            low, high = pr["interval_points"]
            lines.append(f"| {LABELS[r['variant']]} | {name} | {e['full_accuracy']:.3f} | {rc['decider']} | {rc['accuracy']:.3f} | "
                         f"{100 * rc['flops_saved']:+.1f}% | {rc['mean_exit_layer']:.2f} | {fp['accuracy']:.3f} | "
                         f"{100 * fp['flops_saved']:+.1f}% | {fp['mean_exit_layer']:.2f} | {pr['difference_points']:+.1f} "
                         f"[{low:+.1f}, {high:+.1f}] | {pr['only_a']} / {pr['only_b']} | {pr['mcnemar_p']:.2f} | "
                         f"{pr['fp32_policy_within_1_point']} |")
        pooled = pooled_tasks(r)
        if pooled is not None:  # the precision's answer: both tasks' evaluation rows together
            low, high = pooled["interval_points"]
            lines.append(f"| {LABELS[r['variant']]} | both tasks ({pooled['rows']} rows) | | | | | | | | | "
                         f"{pooled['difference_points']:+.1f} [{low:+.1f}, {high:+.1f}] | {pooled['only_a']} / "
                         f"{pooled['only_b']} | {pooled['mcnemar_p']:.2f} | {within_margin(pooled, 1.0)} |")
    return lines


def pooled_tasks(row: dict) -> dict | None:
    """recal − fp32 policy over every task's evaluation rows of one variant (disjoint rows: the counts add)."""
    paired = [e["paired"] for e in row.get("exit", {}).values() if "paired" in e]
    if len(paired) < 2:
        return None
    return paired_counts(sum(p["only_a"] for p in paired), sum(p["only_b"] for p in paired), sum(p["rows"] for p in paired))


def markdown(report: dict, exit_only: bool = False) -> str:
    tables = ([] if exit_only else quality_table(report["rows"]) + [""]) + exit_table(report["rows"])
    return "\n".join(tables)


def plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    drawn = []
    if all("tinystories_ratio" in r for r in rows):  # not with --exit-only
        drawn.append(quality_plot(rows, out, plt))
    if any("exit" in r for r in rows):
        drawn.append(exit_plot(rows, out, plt))
    return drawn


def quality_plot(rows: list[dict], out: Path, plt) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 2.0  # broken variants (W8A8: ratios in the millions) are drawn at the top edge, their values written
    for key, marker, label in (("tinystories_ratio", "o", "TinyStories (held-out)"), ("agnews_ratio", "s", "AG News articles")):
        ax.scatter([r["bundle_mb"] for r in rows], [min(r[key], top) for r in rows], marker=marker, label=label, alpha=0.7)
    seen: dict = {}
    for r in rows:  # one label per variant, stacked where variants share a size
        k = seen[round(r["bundle_mb"])] = seen.get(round(r["bundle_mb"]), -1) + 1
        y = min(r["tinystories_ratio"], top)
        text = r["variant"] if r["tinystories_ratio"] <= top else \
            f"{r['variant']} (×{r['tinystories_ratio']:.0e} / ×{r['agnews_ratio']:.0e}, off scale)"
        ax.annotate(text, (r["bundle_mb"], y), textcoords="offset points", xytext=(6, 4 + 10 * k), fontsize=7)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0.95, top * 1.05)
    ax.set_xlabel("bundle size on disk (MB)")
    ax.set_ylabel("perplexity ÷ fp32's")
    ax.set_title("SmolLM2-135M-Instruct: quality against size", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    first = out.with_name(out.name + "_quality_vs_size.png")
    fig.savefig(first, dpi=110)
    plt.close(fig)
    return first.name


def exit_plot(rows: list[dict], out: Path, plt) -> str:
    fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4.2), sharey=True)
    names = [r["variant"] for r in rows if "exit" in r]
    x = np.arange(len(names))
    for ax, (task, (title, _, _)) in zip(np.atleast_1d(axes), TASKS.items()):
        for offset, how, label in ((-0.2, "recal", "recalibrated"), (0.2, "fp32_policy", "fp32 policy reused")):
            vals = [100 * r["exit"][task][how]["flops_saved"] for r in rows if "exit" in r]
            ax.bar(x + offset, vals, width=0.4, label=label)
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{title}: compute saved by the exit", fontsize=9)
        ax.axhline(0, color="grey", linewidth=0.8)
    np.atleast_1d(axes)[0].set_ylabel("compute saved, % (decisions included)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    second = out.with_name(out.name + "_exit_saving.png")
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return second.name


# ----------------------------------------------------------------------------- driving


def write_report(args, argv: list[str], rows: list[dict], load_start, started: float) -> str:
    """OUT.json, OUT.md and the plots of the rows measured so far (written after every variant, so a run cut short
    keeps what it measured); returns the table and the line that says what the rows are."""
    import onnxruntime
    from adainfer.calib.features import peak_memory_mib

    report = {"command": "python tools/quant_study_smollm2.py " + " ".join(argv),
              "bundle": str(args.bundle), "exit_only": args.exit_only,
              "settings": {k: getattr(args, k) for k in ("calib_rows", "eval_rows", "stories", "articles", "tokens",
                                                         "repeats", "threads", "seed")},
              "counts": {} if args.exit_only else {
                  "tinystories_tokens": rows[0]["tinystories_tokens"], "agnews_tokens": rows[0]["agnews_tokens"],
                  "context_tokens": rows[0]["context_tokens"]},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_start": load_start,
                          "load_average_end": os.getloadavg(), "onnxruntime": onnxruntime.__version__,
                          "nice": os.nice(0)},
              "seconds": time.perf_counter() - started, "peak_memory_mib": peak_memory_mib(), "rows": rows}
    report["table"] = markdown(report, args.exit_only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(report, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    machine = (f"{report['seconds']:.0f} s, load average {load_start[0]:.1f} -> {report['machine']['load_average_end'][0]:.1f} "
               f"on {os.cpu_count()} CPUs, nice {os.nice(0)}.")
    exit_rows_text = (f"early exit per task {args.calib_rows} calibration rows (70% fit, 30% thresholds) and "
                      f"{args.eval_rows} evaluation rows")
    counts = (f"Rows: {exit_rows_text} (the same rows for every variant); recal − fp32 policy: paired difference on "
              f"the evaluation rows, 95% Wald interval for paired proportions, exact McNemar p; \"within 1 pt\": yes when "
              f"the whole interval is ≤ +1 point, no when it is all above, else undecided. {machine}") if args.exit_only else (
              f"Rows: perplexity on {report['counts']['tinystories_tokens']} TinyStories tokens ({args.stories} stories) and "
              f"{report['counts']['agnews_tokens']} AG News tokens ({args.articles} articles), ≤ {args.tokens} tokens each; "
              f"{exit_rows_text}; RSS at a {report['counts']['context_tokens']}-token context. {machine}")
    report["rows_text"] = counts
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(report["table"] + "\n\n" + counts + "\n")
    return report["table"] + "\n\n" + counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, help="the float32 SmolLM2 bundle (adainfer-export of its GGUF)")
    src.add_argument("--gguf", type=Path, help="export this GGUF first (into the scratch directory)")
    p.add_argument("--hf", type=Path, default=None, help="the float32 Hugging Face directory of the same weights (the "
                   "reference of the quality gate; default: the GGUF the bundle records, dequantized again)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "quant" / "smollm2")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calib-rows", type=int, default=300, help="per task: rows that calibrate the exit")
    p.add_argument("--eval-rows", type=int, default=300, help="per task: rows that evaluate it (never calibrated on; "
                   "300 per task, 600 pooled, so that a paired difference of a few points is resolved)")
    p.add_argument("--stories", type=int, default=8, help="held-out TinyStories stories for perplexity")
    p.add_argument("--articles", type=int, default=8, help="AG News articles for perplexity")
    p.add_argument("--tokens", type=int, default=128, help="tokens per text at most; also the timed prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-early-exit", action="store_true")
    p.add_argument("--exit-only", action="store_true", help="only the early-exit columns (and size on disk): no "
                   "perplexity, RSS or timing; for many evaluation rows (write it to its own --out)")
    p.add_argument("--replot", type=Path, help="only redraw the plots and rewrite the table (OUT.md, the JSON's "
                   "table) of a finished run from its JSON")
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        out = args.replot.with_suffix("")
        report["table"] = markdown(report, report.get("exit_only", False))
        # the line that says what the rows are: the JSON's, or (runs written before it kept one) OUT.md's last one
        rows_text = report.get("rows_text") or out.with_suffix(".md").read_text().rstrip("\n").rsplit("\n\n", 1)[-1]
        out.with_suffix(".md").write_text(report["table"] + "\n\n" + rows_text + "\n")
        args.replot.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(plots(report, out))
        return 0
    if args.measure:
        measure_main(*args.measure)
        return 0
    if args.bundle is None and args.gguf is None:
        p.error("give --bundle (the float32 SmolLM2 bundle) or --gguf")
    if args.exit_only and args.no_early_exit:
        p.error("--exit-only and --no-early-exit leave nothing to measure")
    from adainfer.calib.data import read_rows
    from adainfer.exporter import export, load_model, quality
    from adainfer.exporter.gguf_source import gguf_to_hf_dir
    from adainfer.manifest import Manifest
    from adainfer.paths import HELDOUT_TEXT

    variants = ["fp32"] + [v for v in args.variants if v != "fp32"]
    load_start, started = os.getloadavg(), time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="quant-smollm2-") as tmp:
        work = Path(tmp)
        if args.gguf:
            args.bundle = work / "fp32"
            export(args.gguf, args.bundle, progress=False)
        manifest = Manifest.load(args.bundle)
        hf_model = (load_model(args.hf) if args.hf else
                    load_model(gguf_to_hf_dir(args.gguf, work / "hf", progress=False)) if args.gguf else None)
        if hf_model is None:  # the bundle's own config + the GGUF it records, dequantized again
            from adainfer.fetch import KNOWN_MODELS, default_cache, fetch

            gguf = fetch(next(k for k, v in KNOWN_MODELS.items() if v.file_name == manifest.source.file), default_cache())
            hf_model = load_model(gguf_to_hf_dir(gguf, work / "hf", progress=False))
        request: dict = {}
        if not args.exit_only:
            tok, vocab, bos = args.bundle / "tokenizer.json", manifest.vocab_size, manifest.bos_token_id
            stories = quality.held_out_sequences(tok, vocab, bos, stories=args.stories, max_tokens=args.tokens)
            articles = quality.text_sequences([t for t, _, _ in read_rows(AG_NEWS, "agnews")[-args.articles:]], tok,
                                              vocab, bos, args.tokens, AG_NEWS.name)
            long_text = quality.held_out_sequences(tok, vocab, bos, stories=10_000, max_tokens=10_000)
            context = [t for ids in long_text.ids for t in ids][:CONTEXT]
            request = {"texts": {"tinystories": stories.ids, "agnews": articles.ids}, "reference": {},
                       "context_ids": context, "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads}
        kv_fp32: dict = {}
        fp32_chosen: dict = {}
        for name in variants:
            t0 = time.perf_counter()
            bundle, info = build_variant(name, args.bundle, work, hf_model, kv_fp32)
            built = time.perf_counter() - t0
            row = {"variant": name, "precision": VARIANTS[name][0], "block_size": VARIANTS[name][1],
                   "kv": "int8" if VARIANTS[name][2] else "float32", **info, "bundle_mb": bundle_mb(bundle), "build_s": built}
            if not args.exit_only:
                (work / "request.json").write_text(json.dumps(request))
                subprocess.run([sys.executable, __file__, "--measure", str(bundle), str(work / "request.json"),
                                str(work / "result.json")], check=True)
                result = json.loads((work / "result.json").read_text())
                if name == "fp32":
                    request["reference"] = result["top1"]
                row.update(result["row"])
                ref = rows[0] if rows else row
                if "gate" not in row:
                    row["gate"] = gate(VARIANTS[name][0], row, ref)
                for text in ("tinystories", "agnews"):
                    row[f"{text}_ratio"] = row[f"{text}_perplexity"] / ref[f"{text}_perplexity"]
            if not args.no_early_exit:
                row["exit"] = {}
                for task in TASKS:
                    scratch = work / f"heads-{name}-{task}"
                    scratch.mkdir()
                    t1 = time.perf_counter()
                    row["exit"][task] = exit_rows(bundle, task, args, scratch, fp32_chosen)
                    print(f"{name} {task}: {time.perf_counter() - t1:.0f} s", flush=True)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if args.exit_only:
                print(f"{name}: " + "; ".join(
                    f"{t} full {e['full_accuracy']:.3f}, recal {e['recal']['accuracy']:.3f} / {100 * e['recal']['flops_saved']:+.1f}%, "
                    f"fp32 policy {e['fp32_policy']['accuracy']:.3f} / {100 * e['fp32_policy']['flops_saved']:+.1f}%, "
                    f"diff {e['paired']['difference_points']:+.1f} pts" for t, e in row["exit"].items())
                    + f", {row['bundle_mb']:.0f} MB, {row['seconds']:.0f} s", flush=True)
            else:
                print(f"{name}: TS ppl {row['tinystories_perplexity']:.3f} ({row['tinystories_ratio']:.3f}x), AG ppl "
                      f"{row['agnews_perplexity']:.2f} ({row['agnews_ratio']:.3f}x), {row['bundle_mb']:.0f} MB, "
                      f"RSS@2048 {row['peak_rss_2048_mb']:.0f} MB, decode {row['decode_ms_per_token']:.2f} ms/token, "
                      f"{row['seconds']:.0f} s", flush=True)
            if bundle != args.bundle and bundle != kv_fp32.get("bundle"):
                shutil.rmtree(bundle, ignore_errors=True)
            write_report(args, argv if argv is not None else sys.argv[1:], rows, load_start, started)
    print(write_report(args, argv if argv is not None else sys.argv[1:], rows, load_start, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
