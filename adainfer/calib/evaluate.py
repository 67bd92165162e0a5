"""`adainfer eval`: what the bundle's calibrated exit does on a data file, counted honestly.

Agreement, accuracy and compute come from every evaluated position (recorded features, scored
by the runtime's own decider graphs); time comes from real forwards on a sample of prompts
(full depth and early exit, interleaved, on the same prompts), which also checks that the
runtime exits where, and answers what, the simulation says.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
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
from .head_graphs import label_head
from .options import check_eval_options
from .simulate import CostModel, exit_layers, outcome


def decider_scores(decider: ExitDecider, table: FeatureTable) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(scores (N, L), thresholds (L,), answers (N, L) or None) of the runtime's decider on recorded
    features; head and probe graphs are re-run on the recorded hidden states."""
    n, L = table.gap.shape
    p = decider.policy
    scores = np.full((n, L), -np.inf)
    thresholds = np.full(L, p.threshold, dtype=np.float64)
    answers = None
    if p.decision == "probe":
        ids = list(p.label_token_ids)
        answers = table.pred.copy()
        thresholds[:] = np.inf
        for layer in p.layers:
            token, confidence = decider.probe(layer, table.hidden[:, layer - 1])
            scores[:, layer - 1] = confidence
            answers[:, layer - 1] = [ids.index(int(t)) for t in token]
            thresholds[layer - 1] = p.threshold_at(layer, L)
        return scores, thresholds, answers
    for layer in range(1, L):
        if not decider.evaluates(layer):
            continue
        columns = {f: table.column(f)[:, layer - 1] for f in ("gap", "top_prob", "layer_frac", "cos_prev", "norm_ratio")}
        if decider.head_session is not None:
            columns.update(decider._head(table.hidden[:, layer - 1], columns))
        scores[:, layer - 1] = decider.score(columns)
    return scores, thresholds, answers


def task_heads(model, policy: ExitPolicy, dataset, scratch: Path) -> dict:
    """The label head for classification: the bundle's own, or one cut from its final head."""
    if not dataset.is_classification:
        return {}
    if policy.label_head_file and list(policy.label_token_ids) == list(dataset.label_token_ids):
        return {"label": model.bundle.root / policy.label_head_file}
    path = scratch / "label_head.onnx"
    m = model.manifest
    label_head(model.bundle.root / m.graphs["final_head"].file, path, m.vocab_size, dataset.label_token_ids)
    return {"label": path}


def full_depth_decider(model, policy: ExitPolicy, label_head_path: Optional[Path]) -> Optional[ExitDecider]:
    """Full depth answering like the early exit does (classification: the label head, not the full LM head)."""
    if label_head_path is None:
        return None
    never = dataclasses.replace(ExitPolicy.never(), label_token_ids=list(policy.label_token_ids),
                                label_head_file=label_head_path.name)
    return ExitDecider(model, never, root=label_head_path.parent)


def time_forwards(model, prompts: list[list[int]], deciders: dict, full: Optional[ExitDecider]) -> dict:
    """Seconds of real forwards on the same prompts, full depth and every decider, interleaved per prompt;
    with each forward's exit layer and answer."""
    seconds = {name: 0.0 for name in ["full", *deciders]}
    runs = {name: [] for name in ["full", *deciders]}
    contenders = [("full", full), *deciders.items()]
    for i, ids in enumerate(prompts):
        shift = i % len(contenders)  # each contender takes its turn first (warm caches favour the later ones)
        for name, decider in contenders[shift:] + contenders[:shift]:
            started = time.perf_counter()
            p = predict(model, ids, decider)
            seconds[name] += time.perf_counter() - started
            runs[name].append((p.exit_layer, p.token))
    return {"seconds": seconds, "runs": runs}


def calibration_facts(model) -> dict:
    """Peak memory and time of the calibration that wrote the bundle's policy (from calib_report.json)."""
    spec = model.manifest.attachments.get("calib_report")
    if spec is None:
        return {}
    try:
        report = json.loads((model.bundle.root / spec.file).read_text())
    except (OSError, ValueError):
        return {}
    return {"calibration_peak_memory_mib": report.get("peak_memory_mib"), "calibration_seconds": report.get("seconds"),
            "calibration_rows": report.get("rows")}


def evaluate(bundle_dir: Path, data: Path, *, task: str = "text", shots: int = 0, seed: int = 0,
             limit: Optional[int] = None, skip: int = 0, timing_samples: int = 50, policy: Optional[ExitPolicy] = None,
             max_positions_per_doc: Optional[int] = None, progress: bool = False, stratify: bool = False) -> dict:
    check_eval_options(timing_samples, shots=shots, limit=limit, skip=skip, max_positions_per_doc=max_positions_per_doc,
                       seed=seed)
    model = load(bundle_dir)
    policy = policy or load_policy(model)
    if policy is None:
        raise InputError(f"bundle {bundle_dir} has no exit policy: run `adainfer calib {bundle_dir} --data FILE` first")
    if model.tokenizer is None:
        raise InputError(f"bundle {bundle_dir} has no tokenizer; evaluation reads text")
    dataset = load_dataset(data, task, model.tokenizer.encode, shots=shots, seed=seed, limit=limit, skip=skip,
                           max_tokens=model.manifest.max_positions, stratify=stratify)
    if policy.label_token_ids and list(policy.label_token_ids) != list(dataset.label_token_ids):
        raise InputError(f"the exit policy was calibrated for other label words ({policy.label_token_ids}); "
                         f"task {task} uses {dataset.label_token_ids}")
    if dataset.is_classification and not policy.label_token_ids and policy.decision not in ("never", "forced"):
        pass  # an exit calibrated on text, evaluated on a classification task: the label head answers at full depth
    with tempfile.TemporaryDirectory() as scratch:
        heads = task_heads(model, policy, dataset, Path(scratch))
        table = collect(model, dataset, progress=progress, max_positions_per_doc=max_positions_per_doc,
                        label_head=heads.get("label"), seed=seed,
                        hidden_positions_per_doc=None if model.manifest.hidden_size * model.num_layers <= 4096 else 16)
        decider = ExitDecider(model, policy)
        if decider.head_session is not None or policy.decision == "probe":
            table = table.hidden_table()  # head / probe graphs re-run on the kept hidden states
        scores, thresholds, answers = decider_scores(decider, table)
        cost = CostModel(model.manifest, policy)
        result = outcome(table, model.manifest, policy, scores, thresholds, cost, answers=answers,
                         label=policy.threshold).to_dict()
        simulated = exit_layers(scores, thresholds, cost.evaluated)
        rows = np.arange(len(simulated))
        simulated_answer = (table.pred if answers is None else answers)[rows, simulated - 1]

        # real forwards: full depth against early exit on the same prompts, interleaved
        sample = np.random.default_rng(seed).choice(len(table.gap), size=min(timing_samples, len(table.gap)), replace=False)
        by_doc = {e.doc_id: e for e in dataset.examples}
        prompts = [by_doc[int(table.doc_id[r])].ids[: int(table.context[r])] for r in sample]
        full = full_depth_decider(model, policy, heads.get("label"))
        timed = time_forwards(model, prompts, {"early": decider}, full)
    ids = list(dataset.label_token_ids)
    runs = timed["runs"]["early"]
    exits_match = np.mean([run[0] == simulated[r] for run, r in zip(runs, sample)]) if len(sample) else 1.0
    answers_match = (np.mean([ids.index(run[1]) == simulated_answer[r] if run[1] in ids else False
                              for run, r in zip(runs, sample)]) if ids and len(sample) else None)
    result.update({
        "task": task, "positions": int(len(table.gap)), "policy": policy.name, "decision": policy.decision,
        "answers_with": "probe" if policy.answer == "probe" else "model",
        "threshold": policy.threshold,
        "accuracy_full": float(np.mean(table.final == table.gold)) if dataset.is_classification else None,
        "seconds_full": timed["seconds"]["full"], "seconds_early_exit": timed["seconds"]["early"],
        "timed_prompts": len(prompts), "runtime_exits_match_simulation": float(exits_match),
        "runtime_answers_match_simulation": None if answers_match is None else float(answers_match),
        **calibration_facts(model),
    })
    return result
