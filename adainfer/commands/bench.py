"""`adainfer bench [MODEL | --shape NAME] --json OUT`: our chain against what a user would run instead.

MODEL is a GGUF file (or a directory holding one), a Hugging Face model directory, or nothing
(the bundled stories260K). Contenders, each in its own worker process, interleaved over the
repeats with the same prompt and threads: `transformers` (torch eager); onnxruntime-genai fp32
and int4 (its own builder's output of the same weights); llama.cpp (`llama-cpp-python`) on the
GGUF file (GGUF input only); our whole model as one ONNX graph (`monolithic`); our chain at every
precision (`chain_full` = fp32, `chain_fp16`, `chain_int8-dynamic`, `chain_int8-weight`,
`chain_int4`) and the whole model as one int4 graph (`monolithic_int4`: the chain's own per-call cost
is `chain_int4` ÷ `monolithic_int4`); forced exits after L/4, L/2, 3L/4 blocks; for stories260K the calibrated exit.
A peer that cannot be imported (or built) stays in the table as "not installable" with the reason.
Writes JSON (raw timings, statistics, paired ratios), a markdown table and a PNG plot.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

NAME = "bench"
PROMPT_LENGTHS = (16, 128)
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-weight", "int4")
PEERS = ("genai_fp32", "genai_int4", "llamacpp")


def register(sub) -> None:
    p = sub.add_parser(NAME, help="benchmark our chain against transformers, onnxruntime-genai, llama.cpp and one ONNX graph",
                       description=__doc__)
    p.add_argument("model", nargs="?", type=Path, default=None,
                   help="GGUF file, or Hugging Face model directory (default: the bundled stories260K)")
    p.add_argument("--shape", default=None, help="a random-weight Llama shape instead: small or medium")
    p.add_argument("--json", type=Path, required=True, metavar="OUT", help="JSON result file")
    p.add_argument("--markdown", type=Path, default=None, help="markdown table (default: OUT with .md)")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (default: OUT with .png)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per contender (default 1)")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy decode steps timed (default 64)")
    p.add_argument("--threads", type=int, default=None, help="threads for every contender (default: all cores)")
    p.add_argument("--cache-dir", type=Path, default=Path("bundles"),
                   help="where exported bundles and peer builds are kept (default bundles)")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help=f"our chain's precisions, comma-separated (default {','.join(PRECISIONS)})")
    p.add_argument("--contenders", default=None,
                   help="only these contenders, comma-separated names (e.g. chain_full,chain_int4,genai_int4,llamacpp); "
                        "span_<precision> (the blocks as one graph), chain_<precision>_exit@K and chain_global[_exit@K] "
                        "(the chain with ONNX Runtime's global thread pool) run only when named")
    p.add_argument("--peer-python", default=None, metavar="PYTHON",
                   help="interpreter that runs onnxruntime-genai and llama.cpp (default: this one)")
    p.add_argument("--no-peers", action="store_true", help="leave out onnxruntime-genai and llama.cpp")
    p.add_argument("--no-transformers", action="store_true", help="leave out the transformers contender")
    p.add_argument("--no-classifier", action="store_true",
                   help="leave out the calibrated-exit row (and the calibration it needs on first use)")


def _wanted(args):
    chosen = None if args.contenders is None else {n.strip() for n in args.contenders.split(",") if n.strip()}

    def wanted(name: str) -> bool:
        if chosen is not None:
            return name in chosen or (name.startswith("llamacpp") and "llamacpp" in chosen)
        if name == "transformers":
            return not args.no_transformers
        if name.startswith(("genai_", "llamacpp")):
            return not args.no_peers
        if name.startswith(("span_", "chain_global")) or ("_exit@" in name and not name.startswith("chain_exit@")):
            return False  # spans, the global-pool chain and a converted bundle's forced exits: only when named
        return name != "monolithic_spinning"

    return wanted


def _prompt(bundle: Path, manifest) -> tuple[list[int], str]:
    """The longest prompt's ids: held-out TinyStories text in the model's tokenizer (BOS first), or synthetic ids."""
    n = max(PROMPT_LENGTHS)
    tokenizer = bundle / "tokenizer.json"
    if tokenizer.is_file():
        from ..exporter.quality import held_out_sequences

        seqs = held_out_sequences(tokenizer, manifest.vocab_size, manifest.bos_token_id, stories=8, max_tokens=10_000)
        ids = [i for seq in seqs.ids for i in seq]
        if len(ids) >= n:
            return ids[:n], f"the first {n} tokens of {seqs.source} (model tokenizer)"
    ids = [(7 * i + 3) % (manifest.vocab_size - 3) + 3 for i in range(n)]
    if manifest.bos_token_id is not None:
        ids[0] = manifest.bos_token_id
    return ids, "synthetic ids"


def main(args) -> int:
    from ..bench import contenders as C
    from ..bench import measure, peers, report, shapes
    from ..bench.remote import Remote, Worker
    from ..errors import AdainferError, InputError
    from ..manifest import Manifest
    from ..paths import DEFAULT_CALIB_DATA, DEFAULT_MODEL_DIR

    if args.shape is not None and args.model is not None:
        raise InputError("give a MODEL or --shape, not both")
    if args.repeats < 1 or args.decode_tokens < 1 or args.warmup < 0:
        raise InputError("--repeats and --decode-tokens must be at least 1, --warmup at least 0")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    known = (*PRECISIONS, *shapes.VARIANTS)
    unknown = [p for p in precisions if p not in known]
    if unknown or "fp32" not in precisions:
        raise InputError(f"--precisions: choose from {', '.join(known)}, fp32 included")
    threads = args.threads or os.cpu_count() or 1
    wanted = _wanted(args)
    peer_python = args.peer_python or sys.executable
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    source = shapes.source_of(args.model, args.shape, args.cache_dir)
    hf_dir = shapes.hf_dir_for(source)
    bundle = shapes.bundle_for(source, args.cache_dir, progress=True)
    manifest = Manifest.load(bundle)
    L = manifest.num_layers
    forced = C.forced_layers(L)
    is_default = source["kind"] == "model_dir" and Path(source["model_dir"]) == DEFAULT_MODEL_DIR.resolve()
    notes, unavailable = [], {}  # unavailable: name -> {"status", "reason"}
    groups = []  # (names, spec, python, size on disk in bytes, {name: layers})

    def ours(names, path, size, thread_pool="per-session"):
        groups.append((names, {"kind": "ours", "names": names, "path": str(path), "threads": threads,
                               "thread_pool": thread_pool}, sys.executable,
                       size, {n: (int(n.split("@")[1]) if "@" in n else L) for n in names}))

    if wanted("transformers"):
        weights = [hf_dir / "config.json", *sorted(hf_dir.glob("*.safetensors"))] if hf_dir else []
        ours(["transformers"], bundle, peers.size_on_disk(weights) or None)
    for precision in ("fp32", "int4"):
        name = f"genai_{precision}"
        if not wanted(name):
            continue
        if hf_dir is None:
            unavailable[name] = {"status": "skipped", "reason": "a random-weight shape has no model directory to build from"}
            continue
        try:
            out = peers.genai_build(source, hf_dir, precision, args.cache_dir, peer_python)
        except peers.PeerUnavailable as exc:
            unavailable[name] = {"status": exc.status, "reason": str(exc)}
            continue
        groups.append(([name], {"kind": "genai", "names": [name], "path": str(out), "threads": threads, "layers": L},
                       peer_python, peers.size_on_disk([out]), {name: L}))
    if wanted("llamacpp"):
        if source["kind"] != "gguf":
            unavailable["llamacpp"] = {"status": "skipped", "reason": "llama.cpp runs a GGUF file: give one as MODEL"}
        else:
            name = "llamacpp_" + Path(source["gguf"]).stem.rsplit(".", 1)[-1]
            groups.append(([name], {"kind": "llamacpp", "names": [name], "path": source["gguf"], "threads": threads,
                                    "layers": L}, peer_python, Path(source["gguf"]).stat().st_size, {name: L}))
    monolithic_files = [bundle / f for f in ("model.onnx", "model.onnx.data")]
    for name in ("monolithic", "monolithic_spinning"):
        if wanted(name):
            ours([name], bundle, peers.size_on_disk(monolithic_files))
    bundle_size = lambda b: peers.size_on_disk(  # noqa: E731
        p for p in b.iterdir() if p.is_file() and p.name not in ("model.onnx", "model.onnx.data")
        and not p.name.startswith("span_"))
    if wanted("span_fp32"):  # the blocks as one graph: what the chain's per-block calls cost (contenders.Spans)
        ours(["span_fp32"], bundle, None)
    chain = [n for n in ["chain_full", *(f"chain_exit@{k}" for k in forced)] if wanted(n)]
    if is_default and not args.no_classifier and wanted("chain_classifier"):
        from ..runtime import load
        from ..runtime.early_exit import load_policy

        if load_policy(load(bundle, check_digests=False)) is None:
            from ..calib.calibrate import calibrate

            log(f"calibrating the exit classifier on {DEFAULT_CALIB_DATA.name}")
            calibrate(bundle, DEFAULT_CALIB_DATA, progress=False)
        chain.append("chain_classifier")
        notes.append("`chain_classifier` (stories260K only, exit calibrated on the bundled TinyStories sample): prefill "
                     "stops where the classifier fires; decode is `generate(mode=\"early-exit\")`, per token including "
                     "the prompt's forward; its layers column is the mean blocks run per decoded token.")
    if chain:
        ours(chain, bundle, bundle_size(bundle))
    pooled = [n for n in ["chain_global", *(f"chain_global_exit@{k}" for k in forced)] if wanted(n)]
    if pooled:  # the same chain in a process whose sessions share ONNX Runtime's global (spinning) thread pool
        ours(pooled, bundle, bundle_size(bundle), thread_pool="global")
    for precision in precisions[1:]:
        name = f"chain_{precision}"
        if not wanted(name):
            continue
        try:
            converted = shapes.bundle_for(source, args.cache_dir, progress=True, precision=precision)
        except AdainferError as exc:  # e.g. refused by its quality check
            unavailable[name] = {"status": "refused", "reason": str(exc)}
            continue
        exits = [f"{name}_exit@{k}" for k in forced if wanted(f"{name}_exit@{k}")]
        ours([name, *exits], converted, bundle_size(converted))
        if wanted(f"span_{precision}"):
            ours([f"span_{precision}"], converted, None)
        if precision == "int4" and wanted("monolithic_int4"):  # the same int4 kernels without the chain's calls
            whole = shapes.monolithic_at(source, args.cache_dir, "int4")
            ours(["monolithic_int4"], whole, peers.size_on_disk([whole / "model.onnx", whole / "model.onnx.data"]))

    workers, contenders, sizes = [], [], {}
    for names, spec, python, size, layers in groups:
        log(f"starting {', '.join(names)}")
        worker = Worker({**spec, "layers": spec.get("layers", L)}, python=python)
        if worker.status != "ok":
            for name in names:
                unavailable[name] = {"status": worker.status, "reason": worker.reason}
            continue
        workers.append(worker)
        for name in names:
            contenders.append(Remote(worker, name, layers[name]))
            sizes[name] = size if name == names[0] else None
    try:
        prompt, prompt_source = _prompt(bundle, manifest)
        prompts = {n: prompt[:n] for n in PROMPT_LENGTHS}
        log(f"timing {', '.join(c.name for c in contenders)} ({args.repeats} repeats, {threads} threads)")
        failures: dict = {}
        samples = measure.run(contenders, prompts, args.decode_tokens, args.repeats, args.warmup, log=log,
                              failures=failures)
        for name, reason in failures.items():
            unavailable[name] = {"status": "failed", "reason": reason}
        contenders = [c for c in contenders if c.name in samples]
        memory = {w.names[0]: w.request({"op": "memory"}) for w in workers if w.names[0] in samples}
        infos = {c.name: c.info() for c in contenders if c.name.startswith("chain_")}
    finally:
        for worker in workers:
            worker.close()

    from ..accounting import token_cost
    from ..runtime.exit_policy import ExitPolicy

    context = min(PROMPT_LENGTHS) + args.decode_tokens // 2
    rows = {}
    for c in contenders:
        row = {"status": "ok", "layers": c.layers, "timings": {k: measure.stats(v) for k, v in samples[c.name].items()},
               "size_bytes": sizes.get(c.name)}
        if c.name.startswith(("chain", "monolithic")) or c.name == "transformers":
            policy = ExitPolicy.forced(c.layers) if c.layers < L else ExitPolicy.never()
            row["macs_per_token"] = token_cost(manifest, policy, c.layers, context).total
        if c.name in memory:
            row["memory"] = memory[c.name]
        info = infos.get(c.name, {})
        if info.get("prefill_exit_layers"):
            row["prefill_exit_layers"] = info["prefill_exit_layers"]
        if info.get("layers_per_token"):
            row["layers"] = round(sum(info["layers_per_token"]) / len(info["layers_per_token"]), 2)
        if info.get("thread_pool"):
            row["thread_pool"] = info["thread_pool"]
        rows[c.name] = row
    for name, why in unavailable.items():
        rows[name] = {**why, "layers": L}
    notes.append("Peak RSS: the VmHWM of the contender's own worker process after all its runs (prefill of "
                 f"{max(PROMPT_LENGTHS)} tokens included); Δ: over the RSS after its imports, before loading. Forced "
                 "exits share the full-depth chain's process (no RSS of their own). Size: files the contender loads "
                 "(our chain: the bundle without model.onnx; transformers: the float32 safetensors; llama.cpp: the GGUF).")
    if not args.no_peers:
        notes.append(f"Peers ran with {peer_python}.")

    result = {
        "model": source["name"] if source["kind"] != "shape" else f"shape {source['name']}",
        "source": source, "bundle": str(bundle), "num_layers": L,
        "command": "adainfer bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "machine": report.machine(threads),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "decode_tokens": args.decode_tokens,
                     "prompt_lengths": list(PROMPT_LENGTHS), "prompt": prompt_source, "threads": threads,
                     "macs_context": context},
        "contenders": rows, "samples_seconds": samples,
        "ratios": report.ratios(samples, L, forced), "notes": notes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    md = args.markdown or args.json.with_suffix(".md")
    png = args.plot or args.json.with_suffix(".png")
    result["outputs"] = {"json": str(args.json), "markdown": str(md), "plot": str(png)}
    table = report.markdown(result)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(table)
    report.plot(result, png)
    print(table)
    return 0
