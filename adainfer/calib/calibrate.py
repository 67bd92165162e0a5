"""`adainfer calib`: features -> labels -> classifiers -> thresholds -> the cheapest exit that meets the target.

The ways of deciding compared (issue: "cheaper exits"):
  full-head      the exit head (final norm + LM head + softmax) after every block
  head-stride    the exit head only from a calibrated minimum layer, every `stride` layers
  hidden-only    hidden-state features alone (layer, cosine and norm ratio to the previous layer)
  lowrank-r      a rank-r truncated SVD of the LM head gives approximate gap / top prob; the
                 true head runs once, to produce the token, when the classifier fires
Each is scored with compute that includes its own decisions. The winner is written into the
bundle (classifier.onnx, a folded exit head for linear classifiers, exit_policy.json,
calib_report.json, plots) in one atomic update.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import staged_update
from ..errors import AdainferError, InputError
from ..runtime import load
from ..runtime.exit_policy import HEAD_FEATURES, POLICY_FILE, ExitPolicy
from . import classifiers as clfs
from .data import load_dataset
from .features import FeatureTable, collect
from .head_graphs import fold_linear, lowrank_head
from .evidence import check_evidence
from .options import check_calib_options
from .simulate import Outcome, pick, sweep

KINDS = ("svm-linear", "svm-rbf", "logreg")


@dataclass
class Candidate:
    """One way of deciding, fitted and swept on held-out data."""

    name: str
    policy: ExitPolicy
    fitted: Optional[clfs.Fitted]
    curve: list[Outcome]
    chosen: Outcome
    table_key: str = "full"  # which feature table it reads ("full" head or "lowrank")

    def summary(self) -> dict:
        return {"name": self.name, "classifier": self.fitted.kind if self.fitted else "rule",
                "features": self.policy.features, "head": self.policy.head, "min_layer": self.policy.min_layer,
                "stride": self.policy.stride, **self.chosen.to_dict()}


def feature_rows(table: FeatureTable, features: list[str], layers: int) -> np.ndarray:
    """(N * layers, k): the features of layers 1..layers of every position, position-major."""
    return np.stack([table.column(f)[:, :layers].reshape(-1) for f in features], axis=-1).astype(np.float32)


def score_table(fitted: clfs.Fitted, table: FeatureTable) -> np.ndarray:
    x = feature_rows(table, fitted.features, table.num_layers)
    return fitted.score(x).reshape(len(table.gap), table.num_layers)


def split_by_document(table: FeatureTable, holdout: float, seed: int) -> tuple[FeatureTable, FeatureTable]:
    docs = np.unique(table.doc_id)
    if len(docs) < 2:
        raise InputError("calibration needs at least two documents (the split is by document)")
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(docs)[: max(1, int(round(holdout * len(docs))))].tolist())
    mask = np.isin(table.doc_id, list(held))
    return table.subset(~mask), table.subset(mask)


def _fit_candidate(name, kind, features, head, train, held, manifest, labels_kind, target, seed,
                   min_layer=1, stride=1, extras=None) -> Candidate:
    L = train.num_layers
    y = train.labels(labels_kind)[:, : L - 1].reshape(-1)
    fitted = clfs.fit(kind, features, feature_rows(train, features, L - 1), y, seed=seed)
    extras = dict(extras or {}, classifier_macs=fitted.macs())
    policy = ExitPolicy(decision="classifier", features=features, threshold=0.0, head=head, min_layer=min_layer,
                        stride=stride, name=name, extras=extras)
    scores = score_table(fitted, held)
    curve = sweep(held, manifest, policy, scores)
    chosen = pick(curve, target)
    return Candidate(name, dataclasses.replace(policy, threshold=chosen.threshold), fitted, curve, chosen)


def _with_head_features(table: FeatureTable, gap: np.ndarray, prob: np.ndarray) -> FeatureTable:
    return dataclasses.replace(table, gap=gap, top_prob=prob)


def lowrank_table(model, table: FeatureTable, head_path: Path) -> FeatureTable:
    """The table with gap / top prob from the low-rank head (top-1 stays the true head's)."""
    from ..runtime.sessions import make_session

    session = make_session(head_path)
    n, L, h = table.hidden.shape
    _, prob, gap = session.run(["top1_id", "top1_prob", "gap"], {"hidden_states": table.hidden.reshape(-1, h)})
    return _with_head_features(table, gap.reshape(n, L), prob.reshape(n, L))


def calibrate(bundle_dir: Path, data: Path, *, task: str = "text", label: str = "final", target: float = 0.99,
              holdout: float = 0.3, seed: int = 0, shots: int = 0, limit: Optional[int] = None, skip: int = 0,
              max_positions_per_doc: Optional[int] = None, rank: Optional[int] = None, progress: bool = True,
              kinds=KINDS, variant: str = "auto") -> dict:
    """Calibrate and write the exit into the bundle. `variant` forces a way of deciding
    (full-head, head-stride, hidden-only, lowrank); "auto" keeps the one that saves the most."""
    if label not in ("final", "gold"):
        raise InputError(f"--label must be final or gold, got {label!r}")
    if not 0.0 < target <= 1.0:
        raise InputError(f"--target-agreement must be in (0, 1], got {target}")
    check_calib_options(target, holdout, rank, shots=shots, limit=limit, skip=skip,
                        max_positions_per_doc=max_positions_per_doc, seed=seed)
    bundle_dir = Path(bundle_dir)
    model = load(bundle_dir)
    manifest = model.manifest
    check_calib_options(target, holdout, rank, manifest.hidden_size)
    if model.tokenizer is None:
        raise InputError(f"bundle {bundle_dir} has no tokenizer; calibration reads text")
    dataset = load_dataset(data, task, model.tokenizer.encode, shots=shots, seed=seed, limit=limit, skip=skip,
                           max_tokens=manifest.max_positions)
    table = collect(model, dataset, progress=progress, max_positions_per_doc=max_positions_per_doc)
    train, held = split_by_document(table, holdout, seed)
    check_evidence(len(held.gap), target)
    L = manifest.num_layers
    rank = rank or max(4, manifest.hidden_size // 4)

    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        lowrank_path = scratch / "exit_head_lowrank.onnx"
        tables = {"full": (train, held)}
        try:
            lowrank_info = lowrank_head(bundle_dir / manifest.graphs["exit_head"].file, lowrank_path, manifest.vocab_size, rank)
            tables["lowrank"] = (lowrank_table(model, train, lowrank_path), lowrank_table(model, held, lowrank_path))
        except AdainferError as exc:  # a quantized exit head (--quantize-heads) has no float LM head to factor
            lowrank_info = {"skipped": str(exc)}

        # the classifier comparison: every kind on the paper's and the extended features, head after every block
        comparison: list[Candidate] = []
        for kind in kinds:
            for set_name in ("paper", "extended"):
                comparison.append(_fit_candidate(f"{kind}/{set_name}", kind, clfs.FEATURE_SETS[set_name], "full",
                                                 train, held, manifest, label, target, seed))
        rule = ExitPolicy.rule(0.8)
        rule_curve = sweep(held, manifest, rule, held.gap.astype(np.float64))
        from .simulate import outcome

        rule_point = outcome(held, manifest, rule, held.gap.astype(np.float64), 0.8)
        rule_tuned = pick(rule_curve, target)

        # the cheaper ways of deciding, each with the best classifier kind for it
        best_full = max(comparison, key=lambda c: c.chosen.flops_saved)
        variants = [dataclasses.replace(best_full, name="full-head")]
        stride_best = None
        for min_layer in range(1, L):
            for stride in (1, 2):
                c = _fit_candidate(f"head-from-{min_layer}-every-{stride}", best_full.fitted.kind, best_full.fitted.features,
                                   "full", train, held, manifest, label, target, seed, min_layer, stride)
                if stride_best is None or c.chosen.flops_saved > stride_best.chosen.flops_saved:
                    stride_best = c
        variants.append(stride_best)
        hidden_only = max((_fit_candidate("hidden-only", k, clfs.FEATURE_SETS["hidden"], "none", train, held, manifest,
                                          label, target, seed) for k in kinds), key=lambda c: c.chosen.flops_saved)
        variants.append(hidden_only)
        if "lowrank" in tables:
            lr_train, lr_held = tables["lowrank"]
            lowrank = max((_fit_candidate(f"lowrank-{rank}", k, clfs.FEATURE_SETS["extended"], "lowrank", lr_train, lr_held,
                                          manifest, label, target, seed, extras={"rank": rank})
                           for k in kinds), key=lambda c: c.chosen.flops_saved)
            lowrank.table_key = "lowrank"
            variants.append(lowrank)
        if variant == "auto":
            winner = max(variants, key=lambda c: c.chosen.flops_saved)
        else:
            prefix = {"full-head": "full-head", "head-stride": "head-from", "hidden-only": "hidden-only", "lowrank": "lowrank"}
            if variant not in prefix:
                raise InputError(f"unknown variant {variant!r}; choose auto, {', '.join(prefix)}")
            if variant == "lowrank" and "lowrank" not in tables:
                raise InputError(f"variant lowrank is not available: {lowrank_info['skipped']}")
            winner = next(v for v in variants if v.name.startswith(prefix[variant]))

        report = {
            "bundle": str(bundle_dir), "data": str(data), "task": task, "label": label, "target_agreement": target,
            "seed": seed, "holdout": holdout, "positions": {"train": int(len(train.gap)), "held_out": int(len(held.gap))},
            "layer_agreement_with_final": [float(x) for x in (table.pred == table.final[:, None]).mean(0)],
            "oracle": _oracle(held, manifest),
            "classifiers": [c.summary() for c in comparison],
            "paper_rule_gap_0.8": rule_point.to_dict(), "gap_rule_tuned": rule_tuned.to_dict(),
            "variants": [v.summary() for v in variants],
            "chosen": winner.summary(),
            "lowrank_head": lowrank_info,
            "curves": {c.name: [(o.flops_saved, o.agreement) for o in c.curve] for c in [*comparison, *variants]},
        }
        _write(bundle_dir, model, winner, tables[winner.table_key][1], lowrank_path, report, progress)
    return report


def _oracle(held: FeatureTable, manifest) -> dict:
    """A perfect exit (first layer whose top-1 equals the final one), decisions free / at full-head cost."""
    from ..accounting import blocks_macs

    agree = held.pred == held.final[:, None]
    exits = agree.argmax(1) + 1
    full = np.array([blocks_macs(manifest, manifest.num_layers, c) + manifest.macs.final_head for c in held.context])
    free = np.array([blocks_macs(manifest, e, c) + manifest.macs.final_head for e, c in zip(exits, held.context)])
    paid = np.array([blocks_macs(manifest, e, c) + e * manifest.macs.exit_head for e, c in zip(exits, held.context)])
    return {"mean_exit_layer": float(exits.mean()), "flops_saved_free_decisions": float(1 - free.sum() / full.sum()),
            "flops_saved_full_head_each_layer": float(1 - paid.sum() / full.sum())}


def _write(bundle_dir: Path, model, winner: Candidate, held: FeatureTable, lowrank_path: Path, report: dict,
           progress: bool) -> None:
    """classifier.onnx (+ folded head) + exit_policy.json + report + plots, then the manifest: one atomic update."""
    from .plots import write_plots

    manifest = model.manifest
    policy = winner.policy
    fitted = winner.fitted
    x_check = feature_rows(held, fitted.features, held.num_layers)
    with staged_update(bundle_dir) as update:
        fields = clfs.to_onnx(fitted, update.path("classifier.onnx"), x_check)
        names = {"classifier": "classifier.onnx"}
        policy = dataclasses.replace(policy, classifier_file="classifier.onnx", **{k: v for k, v in fields.items() if k != "max_score_error"},
                                     extras={**policy.extras, "manifest_digest": manifest.digest()})
        if policy.head == "lowrank":
            update.path("exit_head_lowrank.onnx").write_bytes(lowrank_path.read_bytes())
            names["exit_head_lowrank"] = "exit_head_lowrank.onnx"
            policy = dataclasses.replace(policy, head_file="exit_head_lowrank.onnx")
        if fitted.is_linear:
            w, b = fitted.linear_form()
            head_idx = [i for i, f in enumerate(fitted.features) if f in HEAD_FEATURES]
            extra_idx = [i for i, f in enumerate(fitted.features) if f not in HEAD_FEATURES]
            if head_idx and [fitted.features[i] for i in head_idx] != ["gap", "top_prob"]:
                raise InputError("folding needs both head features (gap, top_prob)")
            source = None
            if head_idx:
                source = lowrank_path if policy.head == "lowrank" else bundle_dir / manifest.graphs["exit_head"].file
            fold_linear(source, update.path("exit_head_folded.onnx"), w[head_idx], w[extra_idx], b)
            names["exit_head_folded"] = "exit_head_folded.onnx"
            policy = dataclasses.replace(policy, decision="folded", head_file="exit_head_folded.onnx")
        policy.save(update.path(POLICY_FILE))
        names["exit_policy"] = POLICY_FILE
        report["chosen"]["decision"] = policy.decision
        report["classifier_onnx"] = _check_decisions(model, policy, update.dir, held, fitted)
        update.path("calib_report.json").write_text(json.dumps(report, indent=2) + "\n")
        names["calib_report"] = "calib_report.json"
        for key, name in write_plots(report, update.dir).items():
            names[key] = name
        for key, name in names.items():  # attachments: checked on load, outside the export's digest
            manifest = manifest.attach(key, update.dir, name)
        manifest = dataclasses.replace(manifest, extras={**manifest.extras, "exit_decision": policy.decision})
        manifest.save(update.dir)


def _check_decisions(model, policy: ExitPolicy, staged: Path, held: FeatureTable, fitted: clfs.Fitted) -> dict:
    """The runtime's decider (ONNX) must decide exactly as scikit-learn on every held-out example."""
    from ..runtime.early_exit import ExitDecider

    x = feature_rows(held, fitted.features, held.num_layers)
    want = fitted.score(x) >= policy.threshold
    results = {}
    for decision in sorted({"classifier", policy.decision}):
        p = dataclasses.replace(policy, decision=decision, head_file=policy.head_file if decision == "folded" else
                                ("exit_head_lowrank.onnx" if policy.head == "lowrank" else None))
        decider = ExitDecider(model, p, root=staged)
        columns = {f: x[:, i] for i, f in enumerate(fitted.features)}
        if decision == "folded":
            columns = _folded_columns(decider, held, fitted)
        got = decider.score(columns) >= policy.threshold
        mismatches = int(np.sum(got != want))
        if mismatches:
            raise InputError(f"{decision}: ONNX decisions differ from scikit-learn on {mismatches} of {len(want)} held-out examples")
        results[decision] = {"examples": int(len(want)), "mismatches": mismatches}
    return results


def _folded_columns(decider, held: FeatureTable, fitted: clfs.Fitted) -> dict:
    """Run the folded head graph on the recorded hidden states (the head recomputes gap and top prob)."""
    n, L, h = held.hidden.shape
    columns = {f: held.column(f).reshape(-1) for f in ("layer_frac", "cos_prev", "norm_ratio")}
    if decider.head_session is None:
        return columns
    feeds = {"hidden_states": held.hidden.reshape(-1, h)}
    names = decider.head_inputs
    if "extra_features" in names:
        from ..runtime.exit_policy import feature_matrix

        feeds["extra_features"] = feature_matrix(decider.extra, columns)
    if "hidden_states" not in names:
        feeds.pop("hidden_states")
    (score,) = decider.head_session.run(["score"], feeds)
    return {"score": score}
