"""`adainfer calib`: features -> labels -> classifiers -> thresholds -> the cheapest exit that meets the target.

The ways of deciding compared (issue: "cheaper exits"):
  full-head      the exit head (final norm + LM head + softmax) after every block
  head-stride    the exit head only from a calibrated minimum layer, every `stride` layers
  hidden-only    hidden-state features alone (layer, cosine and norm ratio to the previous layer)
  lowrank-r      a rank-r truncated SVD of the LM head gives approximate gap / top prob; the
                 true head runs once, to produce the token, when the classifier fires (text)
  label-head     classification: gap / top prob of the softmax over the label words only, from
                 the label head (final norm + |labels| rows of the LM head): exact and cheap
  probes-final / probes-gold
                 classification: internal classifiers on the hidden state (calib/probes.py)
Each is scored with compute that includes its own decisions, and must meet the goal on
held-out rows (agreement for --label final, accuracy within --max-accuracy-drop of full depth
for --label gold; a lower confidence bound, not the point estimate). The cheapest that meets it
is written into the bundle (classifier.onnx or the probes graph, a folded exit head for linear
classifiers, label_head.onnx for classification, exit_policy.json, calib_report.json, plots)
in one atomic update.
"""

from __future__ import annotations

import dataclasses
import json
import time
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
from . import probes as probe_mod
from .evidence import check_evidence
from .features import FeatureTable, collect, peak_memory_mib
from .head_graphs import fold_linear, label_head, lowrank_head
from .options import check_calib_options
from .simulate import CostModel, Goal, Outcome, outcome, pick, sweep

KINDS = ("svm-linear", "svm-rbf", "logreg")


@dataclass
class Candidate:
    """One way of deciding, fitted and swept on held-out data."""

    name: str
    policy: ExitPolicy
    fitted: Optional[clfs.Fitted]
    curve: list[Outcome]
    chosen: Outcome
    table_key: str = "full"  # which head's gap / top prob it reads ("full", "lowrank", "label")
    probes: Optional[probe_mod.Probes] = None

    def summary(self) -> dict:
        kind = "probes-logreg" if self.probes is not None else (self.fitted.kind if self.fitted else "rule")
        return {"name": self.name, "classifier": kind, "answer": self.policy.answer, "layers": self.policy.layers,
                "layer_thresholds": self.policy.layer_thresholds,
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


@dataclass
class Setting:
    """What every candidate shares: the bundle's manifest, the labels, the goal, the task's label words."""

    manifest: object
    label: str
    goal: Goal
    seed: int = 0
    label_token_ids: tuple = ()

    def policy(self, **kw) -> ExitPolicy:
        if self.label_token_ids:
            kw.setdefault("label_token_ids", list(self.label_token_ids))
            kw.setdefault("label_head_file", LABEL_HEAD_FILE)
        return ExitPolicy(**kw)


LABEL_HEAD_FILE = "label_head.onnx"
PROBES_FILE = "exit_probes.onnx"


def _fit_candidate(name, kind, features, head, train, held, setting: Setting, min_layer=1, stride=1,
                   extras=None) -> Candidate:
    L = train.num_layers
    train_h, held_h = train.with_head(head if head != "none" else "full"), held.with_head(head if head != "none" else "full")
    y = train_h.labels(setting.label)[:, : L - 1].reshape(-1)
    fitted = clfs.fit(kind, features, feature_rows(train_h, features, L - 1), y, seed=setting.seed)
    extras = dict(extras or {}, classifier_macs=fitted.macs())
    policy = setting.policy(decision="classifier", features=features, threshold=0.0, head=head, min_layer=min_layer,
                            stride=stride, name=name, extras=extras)
    scores = score_table(fitted, held_h)
    curve = sweep(held_h, setting.manifest, policy, scores)
    chosen = pick(curve, setting.goal)
    return Candidate(name, dataclasses.replace(policy, threshold=chosen.threshold), fitted, curve, chosen,
                     table_key=head if head in ("lowrank", "label") else "full")


def fit_probe_candidate(train: FeatureTable, held: FeatureTable, setting: Setting, label: str,
                        precisions=np.round(np.arange(0.50, 1.0001, 0.01), 2), c: float = 0.1) -> Candidate:
    """Internal classifiers at every layer but the last; per-layer thresholds at each required precision."""
    L = train.num_layers
    probes = probe_mod.fit_probes(train, label, list(range(1, L)), c=c, seed=setting.seed)
    answers, conf = probe_mod.answers_and_confidence(probes, held)
    target = held.final if setting.goal.metric == "agreement" else held.gold
    right = answers == target[:, None]
    curve, policies = [], []
    for p in precisions:
        taus = [probe_mod.layer_thresholds(conf[:, l - 1], right[:, l - 1], float(p), setting.goal.z) for l in probes.layers]
        layers = [l for l, t in zip(probes.layers, taus) if t < probe_mod.NEVER]
        thresholds = [t for t in taus if t < probe_mod.NEVER]
        if not layers:
            continue
        policy = setting.policy(decision="probe", features=[], threshold=float(p), head="none", name=f"probes-{label}",
                                layers=layers, layer_thresholds=thresholds, head_file=PROBES_FILE, answer="probe",
                                extras={"probe_label": label, "required_precision": float(p), "probe_c": c})
        per_layer = np.full(L, np.inf)
        per_layer[[l - 1 for l in layers]] = thresholds
        curve.append(outcome(held, setting.manifest, policy, conf, per_layer, answers=answers, label=float(p)))
        policies.append(policy)
    never = setting.policy(decision="probe", features=[], threshold=1.0, head="none", name=f"probes-{label}",
                           layers=[1], layer_thresholds=[probe_mod.NEVER], head_file=PROBES_FILE, answer="probe",
                           extras={"probe_label": label, "required_precision": 1.0, "probe_c": c})
    curve.append(outcome(held, setting.manifest, never, conf, np.full(L, np.inf), answers=answers, label=2.0))
    policies.append(never)
    chosen = pick(curve, setting.goal)
    policy = policies[curve.index(chosen)]
    # keep only the probes the policy evaluates, in its layer order
    keep = [probes.layers.index(l) for l in policy.layers]
    kept = probe_mod.Probes(list(policy.layers), probes.weight[keep], probes.bias[keep],
                            [probes.pipelines[i] for i in keep], label, probes.num_labels)
    return Candidate(f"probes-{label}", policy, None, curve, chosen, probes=kept)


def probe_scores(candidate: Candidate, table: FeatureTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence (N, L), per-layer thresholds (L,), answers (N, L)) of a probe candidate on `table`."""
    answers, conf = probe_mod.answers_and_confidence(candidate.probes, table)
    per_layer = np.full(table.num_layers, np.inf)
    per_layer[[l - 1 for l in candidate.policy.layers]] = candidate.policy.layer_thresholds
    return conf, per_layer, answers


def evaluate_candidate(candidate: Candidate, table: FeatureTable, manifest) -> Outcome:
    """The candidate, as calibrated, on other rows (e.g. evaluation rows never calibrated on); the Outcome keeps
    each row's answer, so that two candidates can be compared row by row (`evidence.paired_difference`)."""
    policy = candidate.policy
    if candidate.probes is not None:
        conf, per_layer, answers = probe_scores(candidate, table)
        return outcome(table, manifest, policy, conf, per_layer, answers=answers, label=policy.threshold,
                       keep_answers=True)
    t = table.with_head(candidate.table_key)
    scores = score_table(candidate.fitted, t) if candidate.fitted is not None else t.gap.astype(np.float64)
    return outcome(t, manifest, policy, scores, policy.threshold, keep_answers=True)


def make_goal(label: str, held: FeatureTable, target: float, max_accuracy_drop: float, z: float) -> Goal:
    if label == "gold":
        full = float(np.mean(held.final == held.gold))
        return Goal("accuracy", full - max_accuracy_drop, len(held.gap), z)
    return Goal("agreement", target, len(held.gap), z)


def fit_candidates(train: FeatureTable, held: FeatureTable, setting: Setting, kinds=KINDS, rank: Optional[int] = None,
                   probe_labels: tuple = ()) -> dict:
    """Every way of deciding, calibrated on `train` + `held`: {"comparison", "variants", "rule", "rule_tuned"}."""
    manifest, L = setting.manifest, train.num_layers
    classification = bool(setting.label_token_ids)
    comparison: list[Candidate] = []
    for kind in kinds:  # the paper's classifier on its features (and ours), exit head over the full vocabulary
        for set_name in ("paper", "extended"):
            comparison.append(_fit_candidate(f"{kind}/{set_name}", kind, clfs.FEATURE_SETS[set_name], "full",
                                             train, held, setting))
    rule = setting.policy(decision="rule", features=["gap"], threshold=0.8, head="full", name="gap>=0.8")
    rule_curve = sweep(held, manifest, rule, held.gap.astype(np.float64))
    rule_point = outcome(held, manifest, rule, held.gap.astype(np.float64), 0.8)
    rule_tuned = pick(rule_curve, setting.goal)

    best_full = max(comparison, key=lambda c: (setting.goal.met(c.chosen), c.chosen.flops_saved))
    variants = [dataclasses.replace(best_full, name="full-head")]
    stride_best = None
    for min_layer in range(1, L):
        for stride in (1, 2):
            c = _fit_candidate(f"head-from-{min_layer}-every-{stride}", best_full.fitted.kind, best_full.fitted.features,
                               "full", train, held, setting, min_layer, stride)
            if stride_best is None or c.chosen.flops_saved > stride_best.chosen.flops_saved:
                stride_best = c
    variants.append(stride_best)
    variants.append(max((_fit_candidate("hidden-only", k, clfs.FEATURE_SETS["hidden"], "none", train, held, setting)
                         for k in kinds), key=lambda c: c.chosen.flops_saved))
    if train.lowrank_gap is not None:
        variants.append(max((_fit_candidate(f"lowrank-{rank}", k, clfs.FEATURE_SETS["extended"], "lowrank", train, held,
                                            setting, extras={"rank": rank}) for k in kinds),
                            key=lambda c: c.chosen.flops_saved))
    if classification:
        for set_name in ("paper", "extended"):
            variants.append(max((_fit_candidate(f"label-head/{set_name}", k, clfs.FEATURE_SETS[set_name], "label", train,
                                                held, setting) for k in kinds), key=lambda c: c.chosen.flops_saved))
        if train.hidden is not None and train.hidden_rows is None:
            for probe_label in probe_labels:
                variants.append(fit_probe_candidate(train, held, setting, probe_label))
    return {"comparison": comparison, "variants": variants, "rule": rule_point, "rule_tuned": rule_tuned}


def choose(variants: list[Candidate], goal: Goal, variant: str) -> Candidate:
    """The cheapest way of deciding that meets the goal (or the one `variant` names)."""
    if variant == "auto":
        meeting = [v for v in variants if goal.met(v.chosen)]
        return max(meeting or variants, key=lambda c: c.chosen.flops_saved)
    prefix = {"full-head": "full-head", "head-stride": "head-from", "hidden-only": "hidden-only", "lowrank": "lowrank",
              "label-head": "label-head", "probes": "probes"}
    if variant not in prefix:
        raise InputError(f"unknown variant {variant!r}; choose auto, {', '.join(prefix)}")
    named = [v for v in variants if v.name.startswith(prefix[variant])]
    if not named:
        raise InputError(f"variant {variant} is not available for this task")
    return max(named, key=lambda c: (goal.met(c.chosen), c.chosen.flops_saved))


def calibrate(bundle_dir: Path, data: Path, *, task: str = "text", label: str = "final", target: float = 0.99,
              holdout: float = 0.3, seed: int = 0, shots: int = 0, limit: Optional[int] = None, skip: int = 0,
              max_positions_per_doc: Optional[int] = None, rank: Optional[int] = None, progress: bool = True,
              kinds=KINDS, variant: str = "auto", max_accuracy_drop: float = 0.01, margin_z: float = 1.0,
              stratify: bool = False) -> dict:
    """Calibrate and write the exit into the bundle. `variant` forces a way of deciding
    (full-head, head-stride, hidden-only, lowrank, label-head, probes); "auto" keeps the cheapest
    that meets the goal."""
    if label not in ("final", "gold"):
        raise InputError(f"--label must be final or gold, got {label!r}")
    if not 0.0 < target <= 1.0:
        raise InputError(f"--target-agreement must be in (0, 1], got {target}")
    check_calib_options(target, holdout, rank, shots=shots, limit=limit, skip=skip,
                        max_positions_per_doc=max_positions_per_doc, seed=seed)
    if not 0.0 <= max_accuracy_drop < 1.0:
        raise InputError(f"--max-accuracy-drop must be in [0, 1), got {max_accuracy_drop}")
    started = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    model = load(bundle_dir)
    manifest = model.manifest
    check_calib_options(target, holdout, rank, manifest.hidden_size)
    if model.tokenizer is None:
        raise InputError(f"bundle {bundle_dir} has no tokenizer; calibration reads text")
    dataset = load_dataset(data, task, model.tokenizer.encode, shots=shots, seed=seed, limit=limit, skip=skip,
                           max_tokens=manifest.max_positions, stratify=stratify)
    L = manifest.num_layers
    rank = rank or max(4, manifest.hidden_size // 4)

    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        heads = scratch_heads(bundle_dir, manifest, dataset, scratch, rank)
        table = collect(model, dataset, progress=progress, max_positions_per_doc=max_positions_per_doc,
                        hidden_positions_per_doc=hidden_budget(manifest), lowrank_head=heads.get("lowrank"),
                        label_head=heads.get("label"), seed=seed)
        collected = time.perf_counter()
        train, held = split_by_document(table, holdout, seed)
        if label == "final":  # the evidence rule: refused before anything is trained or written
            check_evidence(len(held.gap), target)
        goal = make_goal(label, held, target, max_accuracy_drop, margin_z)
        setting = Setting(manifest, label, goal, seed, tuple(dataset.label_token_ids))
        fitted = fit_candidates(train, held, setting, kinds, rank, probe_labels=(label,))
        variants = fitted["variants"]
        if variant == "lowrank" and "lowrank" not in heads:
            raise InputError(f"variant lowrank is not available: {heads.get('lowrank_skipped', 'classification uses the label head')}")
        winner = choose(variants, goal, variant)
        report = {
            "bundle": str(bundle_dir), "data": str(data), "task": task, "label": label, "target_agreement": target,
            "goal": dataclasses.asdict(goal), "max_accuracy_drop": max_accuracy_drop,
            "seed": seed, "holdout": holdout, "positions": {"train": int(len(train.gap)), "held_out": int(len(held.gap))},
            "rows": {"calibration": len(dataset.examples), "train": int(len(np.unique(train.doc_id))),
                     "held_out": int(len(np.unique(held.doc_id)))},
            "accuracy_full": float(np.mean(held.final == held.gold)) if task != "text" else None,
            "layer_agreement_with_final": [float(x) for x in (table.pred == table.final[:, None]).mean(0)],
            "oracle": _oracle(held, manifest),
            "classifiers": [c.summary() for c in fitted["comparison"]],
            "paper_rule_gap_0.8": fitted["rule"].to_dict(), "gap_rule_tuned": fitted["rule_tuned"].to_dict(),
            "variants": [v.summary() for v in variants],
            "chosen": winner.summary(),
            "lowrank_head": heads.get("lowrank_info"),
            "curves": {c.name: [(o.flops_saved, o.agreement if goal.metric == "agreement" else o.accuracy)
                                for o in c.curve] for c in [*fitted["comparison"], *variants]},
        }
        report["seconds"] = {"features": collected - started, "fitting": time.perf_counter() - collected}
        report["peak_memory_mib"] = peak_memory_mib()
        _write(bundle_dir, model, winner, held, heads, report, progress)
    return report


def hidden_budget(manifest) -> Optional[int]:
    """Text: hidden states kept per document (every position on small models)."""
    return None if manifest.hidden_size * manifest.num_layers <= 4096 else 16


def scratch_heads(bundle_dir: Path, manifest, dataset, scratch: Path, rank: int) -> dict:
    """The heads calibration reads besides the exit head: the label head (classification) or the
    low-rank head (text; not for a quantized exit head, which has no float LM head to factor)."""
    heads: dict = {}
    if dataset.is_classification:
        heads["label"] = scratch / LABEL_HEAD_FILE
        label_head(bundle_dir / manifest.graphs["final_head"].file, heads["label"], manifest.vocab_size,
                   dataset.label_token_ids)
        return heads
    try:
        heads["lowrank_info"] = lowrank_head(bundle_dir / manifest.graphs["exit_head"].file, scratch / "exit_head_lowrank.onnx",
                                             manifest.vocab_size, rank)
        heads["lowrank"] = scratch / "exit_head_lowrank.onnx"
    except AdainferError as exc:
        heads["lowrank_skipped"] = str(exc)
        heads["lowrank_info"] = {"skipped": str(exc)}
    return heads


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


def write_decider(winner: Candidate, heads: dict, out_dir: Path, bundle_dir: Path, manifest,
                  checked: FeatureTable) -> tuple[ExitPolicy, dict, dict]:
    """The files a candidate decides with, written into `out_dir`; returns (policy, {attachment key: file},
    the check that the ONNX graphs decide as scikit-learn on every row of `checked`)."""
    out_dir = Path(out_dir)
    policy = dataclasses.replace(winner.policy, extras={**winner.policy.extras, "manifest_digest": manifest.digest()})
    fitted = winner.fitted
    names = {}
    if policy.label_head_file:
        (out_dir / LABEL_HEAD_FILE).write_bytes(Path(heads["label"]).read_bytes())
        names["label_head"] = LABEL_HEAD_FILE
    if winner.probes is not None:
        probe_mod.write_graph(winner.probes, policy.label_token_ids, out_dir / PROBES_FILE)
        names["exit_probes"] = PROBES_FILE
        return policy, names, {"probes_onnx": check_probe_decisions(None, policy, out_dir, checked, winner.probes)}
    if fitted is None:  # a rule: the exit head's own outputs
        return policy, names, {}
    t = checked.with_head(winner.table_key)
    x_check = feature_rows(t, fitted.features, t.num_layers)
    fields = clfs.to_onnx(fitted, out_dir / "classifier.onnx", x_check)
    names["classifier"] = "classifier.onnx"
    policy = dataclasses.replace(policy, classifier_file="classifier.onnx",
                                 **{k: v for k, v in fields.items() if k != "max_score_error"})
    if policy.head == "lowrank":
        (out_dir / "exit_head_lowrank.onnx").write_bytes(Path(heads["lowrank"]).read_bytes())
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
            source = {"lowrank": heads.get("lowrank"), "label": heads.get("label")}.get(
                policy.head, bundle_dir / manifest.graphs["exit_head"].file)
        fold_linear(source, out_dir / "exit_head_folded.onnx", w[head_idx], w[extra_idx], b)
        names["exit_head_folded"] = "exit_head_folded.onnx"
        policy = dataclasses.replace(policy, decision="folded", head_file="exit_head_folded.onnx")
    return policy, names, {"classifier_onnx": _check_decisions(None, policy, out_dir, t, fitted)}


def _write(bundle_dir: Path, model, winner: Candidate, held: FeatureTable, heads: dict, report: dict,
           progress: bool) -> None:
    """The decision's graphs + exit_policy.json + report + plots, then the manifest: one atomic update."""
    from .plots import write_plots

    manifest = model.manifest
    checked = held.hidden_table() if held.hidden is not None else held
    with staged_update(bundle_dir) as update:
        policy, names, checks = write_decider(winner, heads, update.dir, bundle_dir, manifest, checked)
        manifest = _add_policy_spans(bundle_dir, manifest, policy, update.dir)
        policy.save(update.path(POLICY_FILE))
        names["exit_policy"] = POLICY_FILE
        report["chosen"]["decision"] = policy.decision
        report.update(checks)
        update.path("calib_report.json").write_text(json.dumps(report, indent=2) + "\n")
        names["calib_report"] = "calib_report.json"
        for key, name in write_plots(report, update.dir).items():
            names[key] = name
        for key, name in names.items():  # attachments: checked on load, outside the export's digest
            manifest = manifest.attach(key, update.dir, name)
        manifest = dataclasses.replace(manifest, extras={**manifest.extras, "exit_decision": policy.decision})
        manifest.save(update.dir)


def _add_policy_spans(bundle_dir: Path, manifest, policy: ExitPolicy, out_dir: Path):
    """The spans between the layers `policy` evaluates (an early-exit step then runs them, not their blocks) and
    the merged kv fills of the layers an exit at each of them skips, written beside the update; only into bundles
    whose export wrote the full-depth span (the weights are then in the shared file the new graphs point into:
    no weight bytes added)."""
    from ..exporter.span_writer import add_spans, exit_fills
    from ..runtime.segments import policy_stops, span_ranges

    L = manifest.num_layers
    if (0, L - 1) not in manifest.spans:
        return manifest
    return add_spans(bundle_dir, manifest, span_ranges(L, policy_stops(policy, L)),
                     fills=exit_fills(L, policy.evaluated_layers(L)), out_dir=out_dir)


class _NoModel:
    """ExitDecider needs only the layer count for classifier / folded / probe graphs."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers


def check_probe_decisions(model, policy: ExitPolicy, staged: Path, table: FeatureTable, probes) -> dict:
    """The runtime's probe graph must give scikit-learn's answers and threshold decisions on every row and layer."""
    from ..runtime.early_exit import ExitDecider

    decider = ExitDecider(model or _NoModel(table.num_layers), policy, root=staged)
    proba = probes.sklearn_proba(table.hidden)
    stops = answers = 0
    for e, layer in enumerate(policy.layers):
        token, confidence = decider.probe(layer, table.hidden[:, layer - 1])
        want_answer = np.asarray(policy.label_token_ids)[proba[:, e].argmax(-1)]
        want_stop = proba[:, e].max(-1) >= policy.layer_thresholds[e]
        got_stop = confidence.astype(np.float64) >= policy.layer_thresholds[e]
        stops += int(np.sum(got_stop != want_stop))
        answers += int(np.sum((token != want_answer) & want_stop))  # the answer matters where the probe exits
    if stops or answers:
        raise InputError(f"probes: ONNX decisions differ from scikit-learn on held-out rows ({stops} exit decisions, "
                         f"{answers} answers at exits)")
    return {"examples": int(len(table.gap)) * len(policy.layers), "mismatches": 0}


def _check_decisions(model, policy: ExitPolicy, staged: Path, held: FeatureTable, fitted: clfs.Fitted,
                     head: str = "full") -> dict:
    """The runtime's decider (ONNX) must decide exactly as scikit-learn on every held-out example."""
    from ..runtime.early_exit import ExitDecider

    x = feature_rows(held, fitted.features, held.num_layers)
    want = fitted.score(x) >= policy.threshold
    results = {}
    for decision in sorted({"classifier", policy.decision}):
        p = dataclasses.replace(policy, decision=decision, head_file=policy.head_file if decision == "folded" else
                                ("exit_head_lowrank.onnx" if policy.head == "lowrank" else None))
        decider = ExitDecider(model or _NoModel(held.num_layers), p, root=staged)
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
    (score,) = _chunked(decider.head_session, ["score"], feeds)
    return {"score": score}


def _chunked(session, outputs, feeds, rows: int = 1024):
    """Run a head graph over many rows in chunks (its vocabulary-sized intermediate stays bounded)."""
    n = len(next(iter(feeds.values())))
    parts = [session.run(outputs, {k: v[i:i + rows] for k, v in feeds.items()}) for i in range(0, n, rows)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]
