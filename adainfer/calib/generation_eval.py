"""`adainfer eval --task generation`: what each generation mode does to the text and to the compute.

For held-out prompts, every mode generates greedily; the full model then scores the generated
text (perplexity), and the tokens are compared with full-depth greedy decoding (tokens until the
first divergence, and the fraction of positions that agree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..runtime import load
from ..runtime.decoding import MODES
from .data import read_documents


def full_model_nll(model, ids: list[int], generated: list[int]) -> float:
    """Mean negative log-likelihood of `generated` after `ids` under the full-depth model."""
    sequence = np.asarray([ids + generated], dtype=np.int64)
    state = model.new_state(1)
    run = model.run_layers(sequence, state)
    logits = model.final_logits(run.hidden[0]).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    positions = np.arange(len(ids) - 1, len(ids) + len(generated) - 1)
    return float(-logprobs[positions, generated].mean())


def evaluate_generation(bundle_dir: Path, data: Path, *, modes: Sequence[str] = MODES, prompts: int = 20,
                        prompt_tokens: int = 16, new_tokens: int = 48, skip: int = 0, max_draft: int = 4,
                        policy=None) -> dict:
    model = load(bundle_dir)
    if model.tokenizer is None:
        raise InputError(f"bundle {bundle_dir} has no tokenizer; evaluation reads text")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise InputError(f"unknown mode {unknown[0]!r}; choose {', '.join(MODES)}")
    docs = read_documents(data)[skip:][:prompts]
    prompt_ids = [model.encode(d)[:prompt_tokens] for d in docs]
    reference = [model.generate(ids, new_tokens, stop_at_eos=False).tokens for ids in prompt_ids]
    results = {}
    for mode in modes:
        rows = []
        for ids, ref in zip(prompt_ids, reference):
            g = model.generate(ids, new_tokens, stop_at_eos=False, mode=mode, max_draft=max_draft, policy=policy)
            same = np.asarray(g.tokens) == np.asarray(ref)
            rows.append({"nll": full_model_nll(model, ids, g.tokens),
                         "prefix": int(len(same) if same.all() else np.argmin(same)), "token_agreement": float(same.mean()),
                         "macs": g.macs_per_token, "decision_macs": g.decision_macs_per_token, "layers": g.mean_layers_per_token,
                         "seconds": g.seconds, "tokens": g.new_tokens, "acceptance": g.acceptance_rate})
        seconds = sum(r["seconds"] for r in rows)
        results[mode] = {
            "perplexity": float(np.exp(np.mean([r["nll"] for r in rows]))),
            "prefix_until_divergence": float(np.mean([r["prefix"] for r in rows])),
            "token_agreement": float(np.mean([r["token_agreement"] for r in rows])),
            "macs_per_token": float(np.mean([r["macs"] for r in rows])),
            "decision_macs_per_token": float(np.mean([r["decision_macs"] for r in rows])),
            "mean_layers_per_token": float(np.mean([r["layers"] for r in rows])),
            "tokens_per_second": sum(r["tokens"] for r in rows) / seconds if seconds else 0.0,
            "acceptance_rate": (float(np.mean([r["acceptance"] for r in rows])) if mode == "speculative" else None),
        }
    full = results.get("full", {}).get("macs_per_token")
    for r in results.values():
        r["compute_vs_full"] = r["macs_per_token"] / full if full else None
    return {"task": "generation", "prompts": len(prompt_ids), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "modes": results}
