"""Generation with early exit on held-out TinyStories prompts: one table, one JSON file.

    python tools/generation_table.py [--bundle bundles/stories260K] [--json out/generation.json]

Modes: full depth; early exit with the skipped layers' caches filled by propagation (approximate);
self-speculative (early-exit drafts verified at full depth: lossless). Each exit mode runs with
the bundle's calibrated policy (target agreement 0.99) and with the paper's fixed rule
(gap >= 0.8), which exits far more often. Greedy decoding; compute counts blocks, heads,
exit decisions and cache fills.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adainfer.calib.generation_eval import evaluate_generation  # noqa: E402
from adainfer.paths import HELDOUT_TEXT  # noqa: E402
from adainfer.runtime.exit_policy import ExitPolicy  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "stories260K")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "generation.json")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    runs = {"calibrated (0.99)": None, "paper rule gap>=0.8": ExitPolicy.rule(0.8)}
    results = {name: evaluate_generation(args.bundle, HELDOUT_TEXT, prompts=args.prompts, new_tokens=args.new_tokens,
                                         policy=policy)
               for name, policy in runs.items()}
    lines = ["| exit policy | mode | tokens/s | layers/token | MACs/token vs full | decision MACs/token | agreement (tokens) | prefix until divergence | perplexity (full model) | acceptance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for mode, r in result["modes"].items():
            acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
            lines.append(f"| {name} | {mode} | {r['tokens_per_second']:.0f} | {r['mean_layers_per_token']:.2f} | "
                         f"{r['compute_vs_full']:.3f} | {r['decision_macs_per_token']:.0f} | {r['token_agreement']:.3f} | "
                         f"{r['prefix_until_divergence']:.1f} | {r['perplexity']:.3f} | {acc} |")
    table = "\n".join(lines)
    print(table)
    print(f"\n{args.prompts} held-out prompts of 16 tokens, {args.new_tokens} new tokens each, greedy; "
          f"machine: {platform.machine()}, {platform.system()}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
