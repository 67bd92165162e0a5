"""`adainfer run [BUNDLE] PROMPT` or `adainfer run [BUNDLE] --chat QUESTION`: stream a continuation
(or the assistant's reply, through the bundle's chat template), or print one JSON object."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

NAME = "run"
DEFAULT_BUNDLE = Path("bundles") / "stories260K"


def register(sub) -> None:
    p = sub.add_parser(NAME, help="generate text from a prompt", description=__doc__)
    p.add_argument("args", nargs="*", metavar="[BUNDLE] PROMPT",
                   help=f"bundle directory (default: {DEFAULT_BUNDLE}) and the prompt (no prompt with --chat)")
    p.add_argument("--chat", metavar="QUESTION", default=None,
                   help="ask QUESTION as the user's message of the bundle's chat template; prints the reply, "
                        "which ends at the template's end-of-turn token")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stop-at-eos", action="store_true")
    p.add_argument("--truncate-prompt", action="store_const", const="left", default=None,
                   help="keep the most recent tokens of a prompt too long for the model (default: refuse it)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--thread-pool", choices=("per-session", "global"), default="per-session",
                   help="ONNX Runtime threads: one pool per session (default; each spins while its session "
                        "runs), or ONNX Runtime's global pool shared by all the bundle's sessions, whose workers spin "
                        "for every graph: on an idle machine its forced exits ran 3%% slower to 15%% faster and its full "
                        "depth level to 14%% slower (README, SmolLM2 bench); with other load on the cores it lost 2-5x")
    p.add_argument("--spin", choices=("on", "off"), default=None,
                   help="ONNX Runtime's spin-waiting threads (cpu backend): on (default) lets each session's threads "
                        "spin while it runs, off keeps them asleep: for a machine busy with other work, where spinning "
                        "threads cost more than they save (per-session pools only: the global pool's workers spin "
                        "whatever this says)")
    p.add_argument("--backend", choices=("cpu", "cpu-iobinding", "ort-cuda", "ort-trt", "tensorrt", "onnxruntime"),
                   default="cpu", help="runtime: ONNX Runtime on the CPU (default; 'onnxruntime' is the older name), the "
                   "same with I/O binding, ONNX Runtime's CUDA / TensorRT providers, or TensorRT engines "
                   "(adainfer build-engines first)")
    p.add_argument("--mode", choices=("full", "early-exit", "speculative"), default="full",
                   help="early-exit: each token stops where the calibrated classifier fires, skipped layers' caches "
                        "filled from the exit state (approximate); speculative: early-exit drafts verified at full "
                        "depth (lossless)")
    p.add_argument("--max-draft", type=int, default=4, help="speculative: most tokens drafted per round")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def main(args) -> int:
    from ..errors import InputError
    from ..runtime import load
    from ..runtime.backends import backend_name
    from ..runtime.limits import check_decoding, check_options, check_threads

    if args.chat is not None:
        if len(args.args) > 1:
            raise InputError("expected [BUNDLE] --chat QUESTION (a prompt and --chat cannot be combined)")
        bundle, prompt = (Path(args.args[0]) if args.args else DEFAULT_BUNDLE), args.chat
    elif not args.args:
        raise InputError("expected [BUNDLE] PROMPT or [BUNDLE] --chat QUESTION")
    elif len(args.args) > 2:
        raise InputError("expected [BUNDLE] PROMPT (quote a prompt that has spaces)")
    else:
        bundle, prompt = (Path(args.args[0]), args.args[1]) if len(args.args) == 2 else (DEFAULT_BUNDLE, args.args[0])
    check_options(args.max_new_tokens, args.temperature, args.top_p, args.seed)  # before any work
    check_decoding(args.mode, args.max_draft)
    check_threads(args.threads)
    backend = backend_name(args.backend)
    if backend in ("cpu", "cpu-iobinding") and args.thread_pool == "global":  # see runtime/sessions.py
        from ..runtime.sessions import use_global_thread_pool

        use_global_thread_pool(args.threads)
    if backend != "cpu" and args.spin is not None:
        raise InputError(f"--spin applies to the cpu backend only (got --backend {backend})")
    spinning = {} if args.spin is None else {"spinning": args.spin == "on"}
    model = load(bundle, threads=args.threads, backend=backend, **spinning)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, stop_at_eos=not args.no_stop_at_eos, truncate=args.truncate_prompt,
                   mode=args.mode, max_draft=args.max_draft)
    if args.chat is not None:
        return _chat(model, bundle, prompt, args, options)
    if args.json:
        print(json.dumps(model.generate(prompt, **options).to_json()))
        return 0
    if args.mode != "full" and model.decider() is None:  # before any text is printed
        raise InputError(f"bundle {bundle} has no exit policy: run `adainfer calib {bundle}` first")
    ids = model.prepare_prompt(prompt, args.max_new_tokens, args.truncate_prompt)
    model.check_request(len(ids), args.max_new_tokens, args.temperature, args.top_p, args.seed)
    started = time.perf_counter()
    out = sys.stdout
    out.write(model.tokenizer.decode(ids) if model.tokenizer else "")
    count = 0
    for event in model.stream(ids, **options):
        out.write(event.text)
        out.flush()
        count += 1
    out.write("\n")
    print(f"[{count} tokens in {time.perf_counter() - started:.2f} s]", file=sys.stderr)
    return 0


def _chat(model, bundle: Path, question: str, args, options: dict) -> int:
    """Print the reply to `question` (streamed, or as one JSON object); the prompt itself is not echoed."""
    from ..errors import InputError
    from ..runtime import conversation as chat

    if args.mode != "full" and model.decider() is None:
        raise InputError(f"bundle {bundle} has no exit policy: run `adainfer calib {bundle}` first")
    if args.json:
        print(json.dumps(chat.chat(model, question, **options).to_json()))
        return 0
    options.pop("max_new_tokens")
    started = time.perf_counter()
    count = 0
    for event in chat.stream(model, question, args.max_new_tokens, **options):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        count += 1
    sys.stdout.write("\n")
    print(f"[{count} tokens in {time.perf_counter() - started:.2f} s]", file=sys.stderr)
    return 0
