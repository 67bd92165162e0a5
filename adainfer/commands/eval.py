"""`adainfer eval BUNDLE --data FILE`: agreement, accuracy and compute saved by the bundle's early exit."""

from __future__ import annotations

import json
from pathlib import Path

from .calib import add_data_options

NAME = "eval"


def register(sub) -> None:
    p = sub.add_parser(NAME, help="evaluate the calibrated early exit", description=__doc__)
    p.add_argument("bundle", type=Path)
    add_data_options(p, generation=True)
    p.add_argument("--timing-samples", type=int, default=50, help="prompts timed at full depth and with early exit")
    p.add_argument("--new-tokens", type=int, default=48, help="generation: tokens generated per prompt")
    p.add_argument("--json", action="store_true")


def main(args) -> int:
    from ..calib.evaluate import evaluate
    from ..calib.options import check_eval_options
    from ..paths import DEFAULT_CALIB_DATA

    check_eval_options(args.timing_samples, args.new_tokens, shots=args.shots, limit=args.limit, skip=args.skip,
                       max_positions_per_doc=args.max_positions_per_doc, seed=args.seed)

    if args.task == "generation":
        from ..calib.generation_eval import evaluate_generation
        from ..paths import HELDOUT_TEXT

        result = evaluate_generation(args.bundle, args.data or HELDOUT_TEXT, prompts=args.limit or 20, skip=args.skip,
                                     new_tokens=args.new_tokens)
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return 0
    result = evaluate(args.bundle, args.data or DEFAULT_CALIB_DATA, task=args.task, shots=args.shots, seed=args.seed,
                      limit=args.limit, skip=args.skip, timing_samples=args.timing_samples,
                      max_positions_per_doc=args.max_positions_per_doc, stratify=args.stratify)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
