"""`adainfer eval`: what the bundle's calibrated exit does on a data file, counted honestly.

Agreement and compute come from every evaluated position (recorded features, scored by the
runtime's own decider graphs); time comes from real early-exit forwards on a sample of
prompts, which also checks that the runtime exits where the simulation says.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..runtime import load
from ..runtime.early_exit import ExitDecider, load_policy, predict
from ..runtime.exit_policy import ExitPolicy
from .data import load_dataset
from .features import FeatureTable, collect
from .options import check_eval_options
from .simulate import exit_layers, outcome, CostModel


def decider_scores(decider: ExitDecider, table: FeatureTable) -> np.ndarray:
    """(N, L) scores of the runtime's decider on recorded features (head graphs re-run on hidden states)."""
    n, L = table.gap.shape
    scores = np.full((n, L), -np.inf)
    for layer in range(1, L):
        columns = {f: table.column(f)[:, layer - 1] for f in ("gap", "top_prob", "layer_frac", "cos_prev", "norm_ratio")}
        if decider.head_session is not None:
            columns.update(decider._head(table.hidden[:, layer - 1], columns))
        scores[:, layer - 1] = decider.score(columns)
    return scores


def _prompts(dataset, table: FeatureTable, count: int, seed: int) -> list[tuple[list[int], int]]:
    """(prefix ids, table row) pairs: whole prompts for classification, random prefixes for text."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(table.gap), size=min(count, len(table.gap)), replace=False)
    by_doc = {e.doc_id: e for e in dataset.examples}
    return [(by_doc[int(table.doc_id[r])].ids[: int(table.context[r])], int(r)) for r in rows]


def evaluate(bundle_dir: Path, data: Path, *, task: str = "text", shots: int = 0, seed: int = 0,
             limit: Optional[int] = None, skip: int = 0, timing_samples: int = 50, policy: Optional[ExitPolicy] = None,
             max_positions_per_doc: Optional[int] = None, progress: bool = False) -> dict:
    check_eval_options(timing_samples, shots=shots, limit=limit, skip=skip, max_positions_per_doc=max_positions_per_doc,
                       seed=seed)
    model = load(bundle_dir)
    policy = policy or load_policy(model)
    if policy is None:
        raise InputError(f"bundle {bundle_dir} has no exit policy: run `adainfer calib {bundle_dir} --data FILE` first")
    if model.tokenizer is None:
        raise InputError(f"bundle {bundle_dir} has no tokenizer; evaluation reads text")
    dataset = load_dataset(data, task, model.tokenizer.encode, shots=shots, seed=seed, limit=limit, skip=skip,
                           max_tokens=model.manifest.max_positions)
    table = collect(model, dataset, progress=progress, max_positions_per_doc=max_positions_per_doc)
    decider = ExitDecider(model, policy)
    scores = decider_scores(decider, table)
    result = outcome(table, model.manifest, policy, scores, policy.threshold).to_dict()
    simulated = exit_layers(scores, policy.threshold, CostModel(model.manifest, policy).evaluated)

    # real forwards: full depth against early exit on the same prompts, interleaved
    samples = _prompts(dataset, table, timing_samples, seed)
    full_s = early_s = 0.0
    matches = 0
    for ids, row in samples:
        started = time.perf_counter()
        predict(model, ids)
        full_s += time.perf_counter() - started
        started = time.perf_counter()
        p = predict(model, ids, decider)
        early_s += time.perf_counter() - started
        matches += int(p.exit_layer == simulated[row])
    result.update({
        "task": task, "positions": int(len(table.gap)), "policy": policy.name, "decision": policy.decision,
        "threshold": policy.threshold, "seconds_full": full_s, "seconds_early_exit": early_s,
        "timed_prompts": len(samples), "runtime_exits_match_simulation": matches / max(1, len(samples)),
    })
    return result
