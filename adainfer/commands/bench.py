"""`adainfer bench [MODEL_DIR | --shape NAME] --json OUT`: our chain against transformers and one ONNX graph.

In one process, interleaving the contenders: `transformers` (torch eager), the whole model as
one ONNX Runtime graph (`model.onnx`), our per-block chain at full depth, with a forced exit at
L/4, L/2, 3L/4, and with the calibrated classifier (the default stories260K model only). Writes
JSON (raw timings, statistics, ratios), a markdown table and a PNG plot.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

NAME = "bench"
PROMPT_LENGTHS = (16, 128)


def register(sub) -> None:
    p = sub.add_parser(NAME, help="benchmark the chain against transformers and a monolithic ONNX graph",
                       description=__doc__)
    p.add_argument("model_dir", nargs="?", type=Path, default=None,
                   help="Hugging Face model directory (default: the bundled stories260K)")
    p.add_argument("--shape", default=None, help="a random-weight Llama shape instead: small or medium")
    p.add_argument("--json", type=Path, required=True, metavar="OUT", help="JSON result file")
    p.add_argument("--markdown", type=Path, default=None, help="markdown table (default: OUT with .md)")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (default: OUT with .png)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per contender (default 1)")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy decode steps timed (default 64)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and ONNX Runtime (default: all cores)")
    p.add_argument("--cache-dir", type=Path, default=Path("bundles"), help="where exported bundles are kept (default bundles)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-transformers", action="store_true", help="leave out the transformers contender")
    p.add_argument("--no-classifier", action="store_true",
                   help="leave out the calibrated-exit row (and the calibration it needs on first use)")


def main(args) -> int:
    from ..errors import InputError
    from ..paths import DEFAULT_CALIB_DATA, DEFAULT_MODEL_DIR
    from ..bench import contenders as C
    from ..bench import measure, memory, report, shapes

    if args.shape is not None and args.model_dir is not None:
        raise InputError("give a MODEL_DIR or --shape, not both")
    if args.repeats < 1 or args.decode_tokens < 1 or args.warmup < 0:
        raise InputError("--repeats and --decode-tokens must be at least 1, --warmup at least 0")
    threads = args.threads or os.cpu_count() or 1
    # torch's OpenMP threads busy-wait after each op by default, stealing the cores from the contender
    # that runs next; set before torch is imported (here, the memory subprocesses inherit it)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    source = shapes.source_of(args.model_dir, args.shape)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    bundle = shapes.bundle_for(source, args.cache_dir, progress=True)
    is_default = args.shape is None and Path(source["model_dir"]) == DEFAULT_MODEL_DIR.resolve()

    model = C.load_chain(bundle, threads)
    notes = []
    from ..runtime.early_exit import load_policy

    is_default = is_default and not args.no_classifier
    if is_default and load_policy(model) is None:
        from ..calib.calibrate import calibrate

        log(f"calibrating the exit classifier on {DEFAULT_CALIB_DATA.name}")
        calibrate(bundle, DEFAULT_CALIB_DATA, progress=False)
        model = C.load_chain(bundle, threads)
    L = model.num_layers
    forced = C.forced_layers(L)
    names = ([] if args.no_transformers else ["transformers"]) + ["monolithic", "monolithic_spinning", "chain_full"]
    names += [f"chain_exit@{k}" for k in forced]
    if is_default and load_policy(model) is not None:
        names.append("chain_classifier")
        notes.append("`chain_classifier` (stories260K only, exit calibrated on the bundled TinyStories sample): prefill "
                     "stops where the classifier fires; decode is `generate(mode=\"early-exit\")`, per token including "
                     "the prompt's forward; its layers column is the mean blocks run per decoded token.")
    else:
        notes.append("No classifier row: an exit calibrated on text for a random-weight (or unrelated) model means nothing.")
    notes.append("`monolithic_spinning`: the same graph with ONNX Runtime's default spin-waiting thread pool; "
                 "`monolithic` and our chain use the chain's session options (no spin-waiting).")
    contenders = [C.build(name, bundle, threads, model=model) for name in names]

    vocab = model.manifest.vocab_size
    prompt = [(7 * i + 3) % (vocab - 3) + 3 for i in range(max(PROMPT_LENGTHS))]
    if model.manifest.bos_token_id is not None:
        prompt[0] = model.manifest.bos_token_id
    prompts = {n: prompt[:n] for n in PROMPT_LENGTHS}
    log(f"timing {', '.join(names)} ({args.repeats} repeats, {threads} threads)")
    samples = measure.run(contenders, prompts, args.decode_tokens, args.repeats, args.warmup, log=log)

    from ..accounting import token_cost
    from ..runtime.exit_policy import ExitPolicy

    context = min(PROMPT_LENGTHS) + args.decode_tokens // 2
    rows = {}
    for c in contenders:
        policy = ExitPolicy.forced(c.layers) if c.layers < L else ExitPolicy.never()
        rows[c.name] = {"layers": c.layers, "macs_per_token": token_cost(model.manifest, policy, c.layers, context).total,
                        "timings": {k: measure.stats(v) for k, v in samples[c.name].items()}}
        if getattr(c, "exit_layers", None):
            rows[c.name]["prefill_exit_layers"] = c.exit_layers[-50:]
        if getattr(c, "layers_per_token", None):
            mean = sum(c.layers_per_token) / len(c.layers_per_token)
            rows[c.name]["layers"] = round(mean, 2)
            if c.exit.decider is not None:
                rows[c.name]["macs_per_token"] = token_cost(model.manifest, c.exit.decider.policy, round(mean), context).total
    if not args.no_memory:
        for name in ("transformers", "monolithic", "chain_full"):
            if name in rows:
                log(f"peak memory of {name} (subprocess)")
                rows[name]["memory"] = memory.measure_in_subprocess(name, bundle, threads, prompts[max(PROMPT_LENGTHS)],
                                                                    args.decode_tokens)
        notes.append("Peak RSS: a fresh process imports what the contender needs, loads it, prefills "
                     f"{max(PROMPT_LENGTHS)} tokens and decodes {args.decode_tokens}; its VmHWM (Δ: over the RSS "
                     "after imports, before loading).")

    result = {
        "model": source["name"] if source["kind"] == "model_dir" else f"shape {source['name']}",
        "source": source, "bundle": str(bundle), "num_layers": L,
        "command": "adainfer bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "machine": report.machine(threads),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "decode_tokens": args.decode_tokens,
                     "prompt_lengths": list(PROMPT_LENGTHS), "threads": threads, "macs_context": context},
        "contenders": rows, "samples_seconds": samples,
        "ratios": report.ratios(samples, L, forced), "notes": notes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    table = report.markdown(result)
    md = args.markdown or args.json.with_suffix(".md")
    png = args.plot or args.json.with_suffix(".png")
    result["outputs"] = {"json": str(args.json), "markdown": str(md), "plot": str(png)}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(table)
    report.plot(result, png)
    print(table)
    return 0
