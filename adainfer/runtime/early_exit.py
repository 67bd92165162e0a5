"""Early exit in the ONNX Runtime chain: decide after a block whether to stop (AdaInfer).

`ExitDecider` computes the policy's features for the last position, scores them and
compares with the threshold. `predict` runs a single forward (classification, next-token
prediction) that stops where the decider says; `trace` runs every block and returns every
layer's hidden states, for calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..accounting import TokenCost, token_cost
from ..errors import BundleError
from . import chain
from .exit_policy import HEAD_FEATURES, POLICY_FILE, Decision, ExitPolicy, decision_from, feature_matrix, hidden_features
from .policy_check import check_decider_sessions, check_policy_files
from .sessions import make_session


class ExitDecider:
    """Executes an `ExitPolicy` for a batch-of-one forward."""

    def __init__(self, model, policy: ExitPolicy, root: Optional[Path] = None):
        policy.validate()
        self.model, self.policy = model, policy
        self.num_layers = model.num_layers
        root = Path(root) if root is not None else model.bundle.root
        self.head_session = None
        self.head_graph = None
        # classification: the label head (final norm + the label words' LM-head rows) gives the answer
        self.label_session = make_session(root / policy.label_head_file) if policy.label_head_file else None
        self.probe_session = make_session(root / policy.head_file) if policy.decision == "probe" else None
        if policy.decision == "probe":
            pass
        elif policy.decision == "folded" or policy.head == "lowrank":
            if not policy.head_file:
                raise BundleError(f"exit policy {policy.name!r} needs head_file")
            self.head_session = make_session(root / policy.head_file)
        elif policy.head == "full" and any(f in HEAD_FEATURES for f in policy.features):
            self.head_graph = "exit_head"
        elif policy.head == "label" and any(f in HEAD_FEATURES for f in policy.features):
            self.head_session = self.label_session
        self.classifier = make_session(root / policy.classifier_file) if policy.decision == "classifier" else None
        self.extra = [f for f in policy.features if f not in HEAD_FEATURES]
        # the decider is shared by every generation of a model: look the sessions' names up once
        self.head_inputs = [i.name for i in self.head_session.get_inputs()] if self.head_session else []
        self.head_outputs = [o.name for o in self.head_session.get_outputs()] if self.head_session else []
        self.classifier_input = self.classifier.get_inputs()[0].name if self.classifier else None
        check_decider_sessions(self)

    def evaluates(self, layer: int) -> bool:
        return self.policy.evaluates(layer, self.num_layers)

    @property
    def needs_previous(self) -> bool:
        """Whether a decision reads the previous layer's hidden state too (cos_prev, norm_ratio):
        then a pass must surface after that layer as well (`segments.boundaries`)."""
        return self.policy.reads_previous_hidden()

    def _head(self, hidden_last: np.ndarray, columns: dict) -> dict:
        hidden_last = np.ascontiguousarray(hidden_last, dtype=np.float32)
        if self.head_graph is not None:
            top1, prob, gap = self.model.exit_features(hidden_last)
            return {"top1_id": top1, "top_prob": prob, "gap": gap}
        if self.head_session is None:
            return {}
        feeds = {}
        if "hidden_states" in self.head_inputs:
            feeds["hidden_states"] = hidden_last
        if "extra_features" in self.head_inputs:
            feeds["extra_features"] = feature_matrix(self.extra, columns)
        values = dict(zip(self.head_outputs, self.head_session.run(self.head_outputs, feeds)))
        if "top1_prob" in values:
            values["top_prob"] = values.pop("top1_prob")
        return values

    def answer(self, hidden_last: np.ndarray) -> np.ndarray:
        """Classification: the label word with the highest logit (label head); token ids, one per row."""
        (token,) = self.label_session.run(["top1_id"], {"hidden_states": np.ascontiguousarray(hidden_last, dtype=np.float32)})
        return token

    def probe(self, layer: int, hidden_last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The internal classifier of `layer`: (answer token ids, confidence) per row."""
        index = np.array([list(self.policy.layers).index(layer)], dtype=np.int64)
        token, confidence = self.probe_session.run(
            ["top1_id", "confidence"], {"hidden_states": np.ascontiguousarray(hidden_last, dtype=np.float32),
                                        "probe_index": index})
        return token, confidence

    def features(self, layer: int, hidden_last: np.ndarray, previous: np.ndarray) -> dict:
        rows = hidden_last.shape[0]
        columns = {"layer_frac": np.full(rows, layer / self.num_layers, dtype=np.float32)}
        if any(f in ("cos_prev", "norm_ratio") for f in self.policy.features):
            columns["cos_prev"], columns["norm_ratio"] = hidden_features(hidden_last, previous)
        columns.update(self._head(hidden_last, columns))
        return columns

    def score(self, columns: dict) -> np.ndarray:
        p = self.policy
        if p.decision == "forced":
            return np.full(len(columns["layer_frac"]), np.inf)
        if p.decision == "rule":
            return np.asarray(columns[p.features[0]], dtype=np.float64)
        if p.decision == "folded":
            return np.asarray(columns["score"], dtype=np.float64).reshape(-1)
        x = feature_matrix(p.features, columns)
        out = self.classifier.run(None, {self.classifier_input: x})[p.score_output]
        out = np.asarray(out, dtype=np.float64)
        return p.score_sign * (out[:, p.score_column] if out.ndim == 2 else out)

    def decide(self, layer: int, hidden_last: np.ndarray, previous: np.ndarray) -> Decision:
        p = self.policy
        if p.decision == "probe":
            token, confidence = self.probe(layer, hidden_last)
            return decision_from(confidence, p.threshold_at(layer, self.num_layers), token)
        columns = self.features(layer, hidden_last, previous)
        score = self.score(columns)
        stop = decision_from(score, p.threshold, None).stop
        if p.label_token_ids and p.head != "label":
            # the full / low-rank head's top-1 is not restricted to the label words: the label head answers
            token = self.answer(hidden_last) if stop else None
        else:
            token = columns.get("top1_id") if p.head in ("full", "label") else None
        return decision_from(score, p.threshold, token)


@dataclass
class Prediction:
    """A single forward with early exit."""

    token: int
    exit_layer: int
    decisions: int
    logits: Optional[np.ndarray]
    cost: TokenCost


class HostDecisions:
    """`Backend.decide` / `make_decider` for backends whose decider runs on the host (`ExitDecider`):
    the last rows of this block's and the previous block's hidden states come to the host."""

    def decide(self, decider, layer: int, hidden, previous):
        return decider.decide(layer, self.host(self.rows(hidden)), self.host(self.rows(previous)))

    def make_decider(self, model, policy):
        return ExitDecider(model, policy)


def predict(model, ids: Sequence[int], decider: Optional[ExitDecider] = None, want_logits: bool = False) -> Prediction:
    """Next-token prediction at the last position of `ids`, stopping early where `decider` says."""
    ids = model.check_ids(ids)
    state = model.new_state(1)
    input_ids = np.asarray([ids], dtype=np.int64)
    run = model.run_layers(input_ids, state, None, decider)
    logits = None
    if run.token is not None and not want_logits:
        token = int(run.token[0])
    elif getattr(decider, "label_session", None) is not None and not want_logits:
        token = int(decider.answer(run.hidden[:, -1, :])[0])  # classification at full depth: label words only
    else:
        logits = model.final_logits(run.hidden[:, -1, :])[0]
        token = int(np.argmax(logits))
    policy = decider.policy if decider is not None else ExitPolicy.never()
    cost = token_cost(model.manifest, policy, run.exit_layer, len(ids))
    return Prediction(token=token, exit_layer=run.exit_layer, decisions=run.decisions, logits=logits, cost=cost)


def trace(model, ids: Sequence[int]) -> list[np.ndarray]:
    """Hidden states after the embedding and after every block: L + 1 arrays of (seq, hidden)."""
    ids = model.check_ids(ids)
    backend = model.backend
    state = model.new_state(1)
    input_ids = np.asarray([ids], dtype=np.int64)
    layers: list[np.ndarray] = []
    chain.run_layers(backend, input_ids, state,
                     observe=lambda layer, hidden: layers.append(backend.host(hidden)[0]))
    state.close()
    return layers


def load_policy(model) -> Optional[ExitPolicy]:
    """The bundle's calibrated policy, if `adainfer calib` wrote one."""
    spec = model.manifest.attachments.get("exit_policy")
    if spec is None:
        return None
    policy = ExitPolicy.load(model.bundle.root / spec.file)
    check_policy_files(policy, model.manifest)
    recorded = policy.extras.get("manifest_digest")
    if recorded is None:
        raise BundleError(f"{spec.file} records no manifest digest (calibrated by an older adainfer); "
                          "run `adainfer calib` again")
    if recorded != model.manifest.digest():  # a policy copied in from another export
        raise BundleError(f"{spec.file} was calibrated for another export of this model "
                          f"(manifest digest {str(recorded)[:12]}); run `adainfer calib` again")
    return policy


__all__ = ["Decision", "ExitDecider", "POLICY_FILE", "Prediction", "load_policy", "predict", "trace"]
