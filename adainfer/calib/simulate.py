"""What an exit policy does on recorded features: where each position exits, agreement, compute.

Decisions are deterministic functions of the recorded features, so this equals running the
policy in the runtime (a test checks that), at a fraction of the time, for every threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..accounting import answer_head_macs, answered_by_decision, decision_macs
from ..manifest import Manifest
from ..runtime.exit_policy import ExitPolicy
from .evidence import meets_target
from .features import FeatureTable


@dataclass
class Outcome:
    threshold: float
    agreement: float
    accuracy: float | None
    flops_saved: float
    flops_saved_excluding_decision: float
    mean_exit_layer: float
    exit_histogram: list[int]
    #: the answer given on each row (N,) when asked for (`outcome(keep_answers=True)`), for paired comparisons; not serialised
    answers: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "answers"}


def exit_layers(scores: np.ndarray, threshold, evaluated: np.ndarray) -> np.ndarray:
    """First evaluated layer (1-based) whose score reaches the threshold (one, or one per layer), else the last layer."""
    fired = (scores >= np.asarray(threshold, dtype=np.float64)) & evaluated[None, :]
    fired[:, -1] = True
    return fired.argmax(axis=1) + 1


class CostModel:
    """Vectorised `accounting.token_cost` over positions."""

    def __init__(self, manifest: Manifest, policy: ExitPolicy):
        L = manifest.num_layers
        const = np.array([b.constant for b in manifest.macs.blocks], dtype=np.float64)
        per_ctx = np.array([b.per_context_token for b in manifest.macs.blocks], dtype=np.float64)
        self.const_cum = np.concatenate([[0.0], np.cumsum(const)])
        self.ctx_cum = np.concatenate([[0.0], np.cumsum(per_ctx)])
        self.evaluated = np.array([policy.evaluates(l, L) for l in range(1, L + 1)])
        self.evals_cum = np.concatenate([[0], np.cumsum(self.evaluated)])
        self.decision = decision_macs(manifest, policy)
        self.decision_answers = answered_by_decision(manifest, policy)
        self.answer_head = answer_head_macs(manifest, policy)
        self.L = L

    def costs(self, exit_layer: np.ndarray, context: np.ndarray):
        blocks = self.const_cum[exit_layer] + self.ctx_cum[exit_layer] * context
        decisions = self.evals_cum[exit_layer] * self.decision
        early = (exit_layer < self.L) & self.evaluated[exit_layer - 1]
        head = np.where(early & self.decision_answers, 0.0, self.answer_head)
        full = self.const_cum[-1] + self.ctx_cum[-1] * context + self.answer_head
        return blocks, decisions, head, full


def outcome(table: FeatureTable, manifest: Manifest, policy: ExitPolicy, scores: np.ndarray, threshold,
            cost: CostModel | None = None, answers: np.ndarray | None = None, label: float | None = None,
            keep_answers: bool = False) -> Outcome:
    """What the policy does on `table`; `answers` (N, L) replaces the layers' own answers (probes),
    `threshold` may be one per layer, and `label` is what the Outcome records as its threshold.
    `keep_answers`: the Outcome keeps each row's answer (not for sweeps: one array per threshold)."""
    cost = cost or CostModel(manifest, policy)
    exits = exit_layers(scores, threshold, cost.evaluated)
    rows = np.arange(len(exits))
    pred = (table.pred if answers is None else answers)[rows, exits - 1]
    blocks, decisions, head, full = cost.costs(exits, table.context)
    accuracy = float(np.mean(pred == table.gold)) if table.task != "text" or (table.gold >= 0).all() else None
    return Outcome(
        threshold=float(threshold if label is None else label),
        agreement=float(np.mean(pred == table.final)),
        accuracy=accuracy,
        flops_saved=float(1.0 - (blocks + decisions + head).sum() / full.sum()),
        flops_saved_excluding_decision=float(1.0 - (blocks + head).sum() / full.sum()),
        mean_exit_layer=float(exits.mean()),
        exit_histogram=np.bincount(exits, minlength=table.num_layers + 1)[1:].tolist(),
        answers=pred if keep_answers else None,
    )


def candidate_thresholds(scores: np.ndarray, evaluated: np.ndarray, count: int = 200) -> np.ndarray:
    """Midpoints between well-separated score values (so float32 ONNX decisions equal float64 ones)."""
    values = np.unique(scores[:, evaluated].ravel())
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.array([np.inf])
    below = values[0] - 1e-3 * (1.0 + abs(values[0]))  # every evaluated layer fires
    if values.size < 2:
        return np.array([below, np.inf])
    mids = (values[1:] + values[:-1]) / 2
    gaps = values[1:] - values[:-1]
    keep = gaps > 1e-4 * (1.0 + np.abs(mids))
    mids = mids[keep]
    if mids.size > count:
        mids = mids[np.unique(np.linspace(0, mids.size - 1, count).astype(int))]
    return np.concatenate([[below], mids, [np.inf]])


def sweep(table: FeatureTable, manifest: Manifest, policy: ExitPolicy, scores: np.ndarray) -> list[Outcome]:
    cost = CostModel(manifest, policy)
    return [outcome(table, manifest, policy, scores, t, cost) for t in candidate_thresholds(scores, cost.evaluated)]


@dataclass(frozen=True)
class Goal:
    """What a calibrated exit must keep on held-out rows: agreement with the full model >= value
    (`--label final`), or accuracy >= value (`--label gold`: full depth's minus the allowed drop).
    Agreement goals follow the evidence rule (`evidence.py`: the one-sided 95% Clopper-Pearson lower
    bound must reach the target); accuracy goals use the lower end of the Wilson interval at z."""

    metric: str  # "agreement" or "accuracy"
    value: float
    rows: int
    z: float = 1.0

    def met(self, o: Outcome) -> bool:
        from .probes import wilson_lower

        observed = getattr(o, self.metric)
        if observed is None:
            return False
        rows = self.rows or int(sum(o.exit_histogram))
        if self.metric == "agreement":  # the evidence rule (evidence.py): a 95% Clopper-Pearson lower bound
            return meets_target(observed, rows, self.value)
        return float(wilson_lower(observed * rows, rows, self.z)) >= self.value - 1e-12


def pick(outcomes: list[Outcome], goal) -> Outcome:
    """The threshold that saves the most compute while meeting the goal (a Goal, or a plain agreement target)."""
    if not isinstance(goal, Goal):
        goal = Goal("agreement", float(goal), 0)
    ok = [o for o in outcomes if goal.met(o)]
    return max(ok, key=lambda o: (o.flops_saved, o.threshold)) if ok else outcomes[-1]
