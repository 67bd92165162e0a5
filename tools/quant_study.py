"""What quantization costs in quality, and what it buys in size, memory and time: one command.

    .venv/bin/python tools/quant_study.py [--out out/quant_study] [--models stories260K random-llama]
                                          [--precisions fp32 fp16 int8-weight int8-dynamic int4] [--quantize-heads]
                                          [--sst2 FILE] [--no-early-exit]

For each model and precision the model is exported (`adainfer.exporter.export_model`, verified at
the precision's stated tolerance) and measured in a fresh subprocess with the light runtime only
(numpy + onnxruntime + tokenizers, as a device would run it), on held-out TinyStories text
(`adainfer/data/tinystories_heldout.txt`, never used for calibration):

- perplexity of the bundle on the text (teacher forcing, each story from its BOS, truncated),
- top-1 agreement with the fp32 bundle of the same model at every position,
- size on disk: the block graphs (`block_NN.onnx` + data) and the whole bundle,
- peak resident memory of the measuring process (VmHWM; see `peak_rss_mb` for why not `ru_maxrss`)
  and the part before the bundle loads (Python, numpy, onnxruntime, tokenizers),
- prefill time (one prompt) and decode time per token, medians of repeats.

Models: `stories260K` (the vendored model, its tokenizer) and `random-llama`: a shape-realistic
Llama (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000) from `transformers.LlamaConfig` with
random weights (seed 0), saved with `save_pretrained`; it has no tokenizer, so it is fed the
stories tokenizer's ids of the same text modulo its vocabulary (the ids are < 512, so unchanged).
Its perplexity is that of random weights (about the vocabulary size): only its agreement and
the differences between precisions mean something.

Early exit (stories260K only; on random weights the exit columns would be meaningless and are
left out): for each precision, the exit is calibrated (`adainfer calib`'s `calibrate`, target
agreement 0.99) on that precision's own bundle ("recal") and, separately, the fp32 bundle's
calibrated policy is copied in (`adainfer calib --reuse-policy`, "fp32 clf"); both are evaluated
with `adainfer eval`'s `evaluate` on data never calibrated on:
- TinyStories text: calibration on the first `EARLY_EXIT["text"]["calib"]` stories of the
  bundled calibration file, evaluation on the first `["eval"]` stories of the held-out file;
- SST-2 (`--sst2`, default ../shared/data/sst2_dev.tsv): prompts "Review: ...\nSentiment:" with
  one demonstration, the label word scored; rows [0, calib) calibrate with the paper's labels
  (`label="gold"`: a layer is positive when its answer is the gold label), rows
  [calib, calib + eval) evaluate. Full-depth accuracy per precision on the evaluation rows.
Agreement is with the same bundle at full depth; compute saved counts the decisions' own cost.

Outputs in --out: `quant_study.json` (every number and the settings), `quant_study.md` (the
table, also printed) and `quant_study.png` (quality against block size). Adding a column: add a
function to `MEASURES` (runs in the subprocess, returns named numbers) and a `Column` to `COLUMNS`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adainfer.paths import DEFAULT_MODEL_DIR, HELDOUT_TEXT  # noqa: E402

PRECISIONS = ["fp32", "fp16", "int8-weight", "int8-dynamic", "int4"]
RANDOM_LLAMA = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=False)
#: per model: stories used for perplexity/agreement, tokens per story at most, prompt and decode lengths
BUDGET = {"stories260K": dict(stories=60, ctx=256, prompt=128, decode=64),
          "random-llama": dict(stories=12, ctx=128, prompt=128, decode=32)}
#: early exit: models it is measured for, and documents / rows for calibration and evaluation
EARLY_EXIT_MODELS = ("stories260K",)
EARLY_EXIT = {"text": dict(calib=60, eval=60, shots=0, label="final"),
              "sst2": dict(calib=300, eval=300, shots=1, label="gold")}
TARGET = 0.99
SST2 = ROOT.parent / "shared" / "data" / "sst2_dev.tsv"


# ----------------------------------------------------------------------------- measuring (subprocess)


@dataclass
class Context:
    """What a measure sees: the loaded bundle, the token sequences, the fp32 reference (None for fp32)."""

    model: object
    sequences: list[list[int]]
    reference_top1: Optional[list[np.ndarray]]
    repeats: int
    prompt: int
    decode: int
    scratch: dict


def all_position_logits(model, ids: list[int]) -> np.ndarray:
    """Logits at every position of one sequence (teacher forcing) through the runtime's own layer loop
    (as `adainfer.exporter.quality.all_position_logits`, which this light subprocess cannot import: torch)."""
    input_ids = np.asarray([ids], dtype=np.int64)
    run = model.run_layers(input_ids, model.new_state(1), np.ones_like(input_ids))
    return model.final_logits(run.hidden[0])


def measure_quality(ctx: Context) -> dict:
    nll, count, agree, top1 = 0.0, 0, 0, []
    for i, ids in enumerate(ctx.sequences):
        logits = all_position_logits(ctx.model, ids)[:-1].astype(np.float64)
        targets = np.asarray(ids[1:])
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted[np.arange(len(targets)), targets] - np.log(np.exp(shifted).sum(-1))
        nll -= float(logp.sum())
        count += len(targets)
        top1.append(logits.argmax(-1))
        if ctx.reference_top1 is not None:
            agree += int((top1[-1] == ctx.reference_top1[i]).sum())
    ctx.scratch["top1"] = top1
    return {"tokens": count, "perplexity": float(np.exp(nll / count)),
            "top1_agreement": 1.0 if ctx.reference_top1 is None else agree / count}


def measure_speed(ctx: Context) -> dict:
    prompt = [t for ids in ctx.sequences for t in ids][: ctx.prompt]
    prefill, decode = [], []
    for _ in range(ctx.repeats):
        started = time.perf_counter()
        state, logits = ctx.model.start([prompt])
        prefill.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(ctx.decode):
            logits = ctx.model.step(state, [int(logits[0].argmax())])
        decode.append((time.perf_counter() - started) / ctx.decode)
    return {"prefill_ms": 1e3 * statistics.median(prefill), "prefill_tokens": len(prompt),
            "decode_ms_per_token": 1e3 * statistics.median(decode)}


#: run in order in the measuring subprocess; each returns named numbers for the row
MEASURES: list[Callable[[Context], dict]] = [measure_quality, measure_speed]


def peak_rss_mb() -> float:
    """Peak resident memory of this process image: VmHWM where Linux has it, else `ru_maxrss`.

    On Linux `getrusage(RUSAGE_SELF).ru_maxrss` keeps the high-water mark of the image before
    execve, i.e. of the parent that spawned us (about 450 MB here, torch loaded), so it cannot
    measure a small child; /proc/self/status VmHWM belongs to the new image only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_main(args) -> None:
    """Subprocess entry: load the bundle with the light runtime, run MEASURES, write JSON."""
    import adainfer.runtime as rt

    rss_imports = peak_rss_mb()
    data = json.loads(Path(args.measure_input).read_text())
    model = rt.load(args.measure, threads=data["threads"])
    reference = [np.asarray(r) for r in data["reference_top1"]] if data["reference_top1"] is not None else None
    ctx = Context(model=model, sequences=data["sequences"], reference_top1=reference, repeats=data["repeats"],
                  prompt=data["prompt"], decode=data["decode"], scratch={})
    row = {}
    for measure in MEASURES:
        row.update(measure(ctx))
    row["peak_rss_mb"] = peak_rss_mb()
    row["rss_before_bundle_mb"] = rss_imports
    row["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # includes the parent's, see above
    row["torch_loaded"] = "torch" in sys.modules
    out = {"row": row, "top1": [t.tolist() for t in ctx.scratch.get("top1", [])]}
    Path(args.measure_output).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- driving (main process)


@dataclass
class Column:
    key: str
    title: str
    fmt: str


COLUMNS = [
    Column("precision", "precision", "{}"),
    Column("perplexity", "perplexity", "{:.3f}"),
    Column("top1_agreement", "top-1 = fp32", "{:.2%}"),
    Column("blocks_mb", "blocks (MB)", "{:.2f}"),
    Column("total_mb", "bundle (MB)", "{:.2f}"),
    Column("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    Column("rss_before_bundle_mb", "of which runtime (MB)", "{:.0f}"),
    Column("prefill_ms", "prefill (ms)", "{:.1f}"),
    Column("decode_ms_per_token", "decode (ms/token)", "{:.2f}"),
]


def held_out_sequences(path: Path, stories: int, ctx: int, vocab: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    texts = [t.strip() for t in path.read_text(encoding="utf-8").split("<|endoftext|>") if t.strip()]
    return [[i % vocab for i in tok.encode(t).ids[:ctx]] for t in texts[:stories]]


def random_llama_dir(root: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**RANDOM_LLAMA)).eval()
    out = root / "random-llama"
    model.save_pretrained(out, safe_serialization=True)
    return out


def sizes(bundle: Path, num_layers: int) -> dict:
    files = [p for p in bundle.iterdir() if p.is_file()]
    blocks = [p for p in files if p.name.split(".")[0] in {f"block_{i:02d}" for i in range(num_layers)}]
    return {"blocks_mb": sum(p.stat().st_size for p in blocks) / 1e6, "total_mb": sum(p.stat().st_size for p in files) / 1e6}


def study_model(name: str, model_dir: Path, work: Path, args) -> list[dict]:
    from adainfer.exporter import export_model, load_model

    budget = BUDGET[name]
    fp32_calibrated: dict = {}
    hf = load_model(model_dir)
    sequences = held_out_sequences(args.text, budget["stories"], budget["ctx"], hf.config.vocab_size)
    rows, reference = [], None
    for precision in args.precisions:
        bundle = work / f"{name}-{precision}"
        started = time.perf_counter()
        manifest = export_model(hf, bundle, model_dir=model_dir, precision=precision, quantize_heads=args.quantize_heads)
        export_s = time.perf_counter() - started
        request = {"sequences": sequences, "reference_top1": reference, "repeats": args.repeats, "threads": args.threads,
                   "prompt": budget["prompt"], "decode": budget["decode"]}
        (work / "request.json").write_text(json.dumps(request))
        subprocess.run([sys.executable, __file__, "--measure", str(bundle), "--measure-input", str(work / "request.json"),
                        "--measure-output", str(work / "result.json")], check=True)
        result = json.loads((work / "result.json").read_text())
        if precision == "fp32":
            reference = result["top1"]
        row = {"model": name, "precision": precision, **result["row"], **sizes(bundle, manifest.num_layers),
               "export_s": export_s, "graph_precisions": {k: g.precision for k, g in manifest.graphs.items()}}
        rows.append(row)
        print(f"  {name} {precision}: ppl {row['perplexity']:.3f}, agreement {row['top1_agreement']:.2%}, "
              f"blocks {row['blocks_mb']:.2f} MB, decode {row['decode_ms_per_token']:.2f} ms/token", flush=True)
        if name in EARLY_EXIT_MODELS and not args.no_early_exit and "fp32" in args.precisions:
            row.update(early_exit_columns(bundle, precision, fp32_calibrated, work, args))
    if "fp32" not in args.precisions:
        for row in rows:
            row["top1_agreement"] = float("nan")
    return rows


def early_exit_columns(bundle: Path, precision: str, fp32_calibrated: dict, work: Path, args) -> dict:
    """Recalibrated on this precision and fp32 classifier reused: agreement, compute saved, accuracy."""
    import shutil

    from adainfer.calib.calibrate import calibrate
    from adainfer.calib.data import load_dataset
    from adainfer.calib.evaluate import evaluate
    from adainfer.calib.features import collect
    from adainfer.calib.transfer import reuse_policy
    from adainfer.errors import AdainferError
    from adainfer.paths import DEFAULT_CALIB_DATA
    from adainfer.runtime import load

    setups = {"text": (DEFAULT_CALIB_DATA, args.text)}
    if args.sst2.exists():
        setups["sst2"] = (args.sst2, args.sst2)
    out = {}
    for task, (calib_file, eval_file) in setups.items():
        b = EARLY_EXIT[task]
        skip = b["calib"] if calib_file == eval_file else 0
        eval_opts = dict(task=task, shots=b["shots"], limit=b["eval"], skip=skip, timing_samples=args.timing_samples)
        recal = work / f"{bundle.name}-{task}-recal"
        shutil.rmtree(recal, ignore_errors=True)
        shutil.copytree(bundle, recal)
        started = time.perf_counter()
        try:
            report = calibrate(recal, calib_file, task=task, label=b["label"], target=TARGET, shots=b["shots"],
                               limit=b["calib"], progress=False)
        except AdainferError as exc:  # e.g. int8-dynamic heads: activation scales depend on the batch's rows
            print(f"    early exit {task}: calibration refused: {exc}", flush=True)
            out[f"ee_{task}_refused"] = str(exc)
            continue
        calib_s = time.perf_counter() - started
        results = {"recal": evaluate(recal, eval_file, **eval_opts)}
        results["recal"].update(chosen=report["chosen"]["name"], calib_s=calib_s)
        if precision == "fp32":
            fp32_calibrated[task] = recal
            results["reuse"] = results["recal"]
        else:
            reused = work / f"{bundle.name}-{task}-reuse"
            shutil.rmtree(reused, ignore_errors=True)
            shutil.copytree(bundle, reused)
            reuse_policy(fp32_calibrated[task], reused)
            results["reuse"] = evaluate(reused, eval_file, **eval_opts)
        for how, r in results.items():
            for key in ("agreement", "flops_saved", "flops_saved_excluding_decision", "mean_exit_layer", "accuracy"):
                out[f"ee_{task}_{how}_{key}"] = r[key]
            out[f"ee_{task}_{how}_policy"] = r["policy"]
            out[f"ee_{task}_{how}_time_ratio"] = r["seconds_early_exit"] / r["seconds_full"]
        out[f"ee_{task}_positions"] = results["recal"]["positions"]
        out[f"ee_{task}_recal_chosen"] = results["recal"]["chosen"]
        if task != "text":
            model = load(bundle)
            data = load_dataset(eval_file, task, model.tokenizer.encode, shots=b["shots"], limit=b["eval"], skip=skip,
                                max_tokens=model.manifest.max_positions)
            table = collect(model, data, keep_hidden=False, progress=False)
            out[f"{task}_full_accuracy"] = float((table.final == table.gold).mean())
        print(f"    early exit {task}: recal agreement {results['recal']['agreement']:.4f} saved "
              f"{results['recal']['flops_saved']:+.1%}; fp32 clf agreement {results['reuse']['agreement']:.4f} "
              f"saved {results['reuse']['flops_saved']:+.1%}", flush=True)
    return out


EE_COLUMNS = {
    "text": [Column("precision", "precision", "{}"),
             Column("ee_text_recal_agreement", "agreement, recal", "{:.4f}"),
             Column("ee_text_recal_flops_saved", "compute saved, recal", "{:+.1%}"),
             Column("ee_text_recal_mean_exit_layer", "mean exit layer, recal", "{:.2f}"),
             Column("ee_text_reuse_agreement", "agreement, fp32 clf", "{:.4f}"),
             Column("ee_text_reuse_flops_saved", "compute saved, fp32 clf", "{:+.1%}"),
             Column("ee_text_reuse_mean_exit_layer", "mean exit layer, fp32 clf", "{:.2f}")],
    "sst2": [Column("precision", "precision", "{}"),
             Column("sst2_full_accuracy", "accuracy, full depth", "{:.3f}"),
             Column("ee_sst2_recal_accuracy", "accuracy, recal", "{:.3f}"),
             Column("ee_sst2_recal_agreement", "agreement, recal", "{:.4f}"),
             Column("ee_sst2_recal_flops_saved", "compute saved, recal", "{:+.1%}"),
             Column("ee_sst2_reuse_accuracy", "accuracy, fp32 clf", "{:.3f}"),
             Column("ee_sst2_reuse_agreement", "agreement, fp32 clf", "{:.4f}"),
             Column("ee_sst2_reuse_flops_saved", "compute saved, fp32 clf", "{:+.1%}")],
}


def early_exit_markdown(rows: list[dict]) -> str:
    out = []
    for task, columns in EE_COLUMNS.items():
        model_rows = [r for r in rows if f"ee_{task}_recal_agreement" in r]
        if not model_rows:
            continue
        b = EARLY_EXIT[task]
        where = (f"calibrated on {b['calib']} stories of tinystories_calib.txt, evaluated on {b['eval']} held-out stories "
                 f"({model_rows[0]['ee_text_positions']} positions)" if task == "text" else
                 f"rows 0-{b['calib'] - 1} of sst2_dev.tsv calibrate (label=gold), rows {b['calib']}-{b['calib'] + b['eval'] - 1} "
                 f"evaluate, {b['shots']} demonstration per prompt")
        out.append(f"**{model_rows[0]['model']}, early exit on {'TinyStories text' if task == 'text' else 'SST-2'}** "
                   f"(target agreement {TARGET}; {where})\n")
        out.append("| " + " | ".join(c.title for c in columns) + " |")
        out.append("|" + "|".join("---" for _ in columns) + "|")
        for r in [r for r in rows if r["model"] == model_rows[0]["model"]]:
            if f"ee_{task}_refused" in r:
                out.append(f"| {r['precision']} | calibration refused: {r[f'ee_{task}_refused']} |")
            else:
                out.append("| " + " | ".join(c.fmt.format(r[c.key]) for c in columns) + " |")
        out.append("")
    return "\n".join(out)


def markdown(rows: list[dict], models: list[str]) -> str:
    out = []
    for name in models:
        model_rows = [r for r in rows if r["model"] == name]
        if not model_rows:
            continue
        out.append(f"**{name}** ({model_rows[0]['tokens']} tokens of held-out TinyStories, prefill of "
                   f"{model_rows[0]['prefill_tokens']} tokens)\n")
        out.append("| " + " | ".join(c.title for c in COLUMNS) + " |")
        out.append("|" + "|".join("---" for _ in COLUMNS) + "|")
        for r in model_rows:
            out.append("| " + " | ".join(c.fmt.format(r[c.key]) for c in COLUMNS) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in models if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for col, name in enumerate(models):
        model_rows = [r for r in rows if r["model"] == name]
        for row_index, (key, label) in enumerate([("top1_agreement", "top-1 agreement with fp32"),
                                                  ("perplexity", "perplexity (held-out TinyStories)")]):
            ax = axes[row_index][col]
            xs = [r["blocks_mb"] for r in model_rows]
            ys = [100 * r[key] if key == "top1_agreement" else r[key] for r in model_rows]
            ax.plot(xs, ys, "o")
            for x, y, r in zip(xs, ys, model_rows):
                ax.annotate(r["precision"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel("block graphs on disk (MB)")
            ax.set_ylabel(label + (" (%)" if key == "top1_agreement" else ""))
            ax.set_title(name)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/quant_study"))
    p.add_argument("--models", nargs="+", default=["stories260K", "random-llama"], choices=list(BUDGET))
    p.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS)
    p.add_argument("--quantize-heads", action="store_true", help="convert the embedding and heads too")
    p.add_argument("--text", type=Path, default=HELDOUT_TEXT)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--sst2", type=Path, default=SST2, help="SST-2 dev TSV (skipped when missing)")
    p.add_argument("--timing-samples", type=int, default=20, help="early exit: prompts timed full vs early")
    p.add_argument("--no-early-exit", action="store_true", help="skip the early-exit columns")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--measure-input", help=argparse.SUPPRESS)
    p.add_argument("--measure-output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        measure_main(args)
        return 0
    if "fp32" in args.precisions:  # the reference runs first
        args.precisions = ["fp32"] + [x for x in args.precisions if x != "fp32"]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-study-") as tmp:
        work = Path(tmp)
        for name in args.models:
            model_dir = DEFAULT_MODEL_DIR if name == "stories260K" else random_llama_dir(work)
            rows += study_model(name, model_dir, work, args)
    import onnxruntime

    command = "python tools/quant_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = [f"held-out text: {args.text.name}; random-llama is fed the stories tokenizer's ids modulo 32000 "
             "(unchanged, they are < 512) and has random weights: its perplexity is meaningless, compare precisions",
             f"embedding and heads: {'converted too' if args.quantize_heads else 'kept fp32'}; times are medians of "
             f"{args.repeats} repeats with {args.threads} ONNX Runtime threads; peak RSS includes "
             "Python + numpy + onnxruntime (rss_before_bundle_mb) and is /proc VmHWM, not ru_maxrss (inherited over execve)",
             "early exit: stories260K only (random-llama has random weights, its exits would mean nothing); recal = "
             "classifier calibrated on that precision's bundle, fp32 clf = the fp32 bundle's policy copied in "
             "(reuse_policy); agreement = with the same bundle at full depth; compute saved includes the decisions"]
    report = {"command": command.strip(), "seconds": time.perf_counter() - started, "notes": notes,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                          "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
              "random_llama": RANDOM_LLAMA, "budget": BUDGET, "early_exit": {"target": TARGET, **EARLY_EXIT},
              "rows": rows}
    (args.out / "quant_study.json").write_text(json.dumps(report, indent=2) + "\n")
    table = (markdown(rows, args.models) + "\n" + early_exit_markdown(rows) + "\n"
             + "\n".join(f"- {n}" for n in notes) + "\n")
    (args.out / "quant_study.md").write_text(table)
    plot(rows, args.models, args.out / "quant_study.png")
    print(table)
    print(f"wrote {args.out}/quant_study.{{json,md,png}} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
