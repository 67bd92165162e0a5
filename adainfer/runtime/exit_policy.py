"""The early-exit decision as the runtime executes it: which layers ask, what computes the
features, which classifier scores them, and the threshold. Stored in the bundle as
`exit_policy.json` (written by `adainfer calib`), and vouched for by the manifest.

Features (in this order, the classifier's input columns):
  gap        p(top1) - p(top2) of the exit head's distribution
  top_prob   p(top1)
  layer_frac layer index / number of layers (1-based)
  cos_prev   cosine similarity of this layer's hidden state with the previous layer's
  norm_ratio |h_l| / |h_{l-1}|
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import BundleError
from .policy_check import check_policy_data, check_policy_values

FEATURES = ("gap", "top_prob", "layer_frac", "cos_prev", "norm_ratio")
HEAD_FEATURES = ("gap", "top_prob")
POLICY_FILE = "exit_policy.json"


@dataclass(frozen=True)
class ExitPolicy:
    """How and where to decide. `decision` is one of:
    - "classifier": `classifier.onnx` (skl2onnx) scores the features, score = sign * output[column];
    - "folded": the exit-head graph `head_file` also outputs `score` (linear classifier as MatMul/Add);
    - "rule": score = the first feature (e.g. the paper's gap >= 0.8);
    - "probe": internal classifiers (DeeBERT-style): `head_file` holds one linear model per
      evaluated layer on the last position's hidden state (inputs hidden_states, probe_index;
      outputs answer = label index, confidence = its softmax probability); stop when the
      confidence reaches `layer_thresholds[i]` for the i-th evaluated layer; the answer is the probe's;
    - "forced": stop at `min_layer`, no decision;
    - "never": full depth.
    The policy stops at layer l (1-based) when l is evaluated and score >= threshold.

    Classification policies carry `label_token_ids` (the first token of each label word): the
    answer is the label word with the highest logit, computed by `label_head_file` (final norm +
    those rows of the LM head). `head` "label" reads gap / top prob from that label head (a
    softmax over the label words only). `answer` says who answers at an early exit: "head" (the
    exit / label head's top-1) or "probe" (the internal classifier)."""

    decision: str
    features: list[str]
    threshold: float
    head: str = "full"  # "full" (exit_head.onnx), "lowrank" (head_file), "none" (hidden-state features only)
    min_layer: int = 1
    stride: int = 1
    head_file: Optional[str] = None
    classifier_file: Optional[str] = None
    score_output: int = 1
    score_column: int = 0
    score_sign: float = 1.0
    name: str = ""
    label_token_ids: list = field(default_factory=list)
    label_head_file: Optional[str] = None
    layers: list = field(default_factory=list)  # explicit evaluated layers (overrides min_layer / stride)
    layer_thresholds: list = field(default_factory=list)  # one per evaluated layer (decision "probe")
    answer: str = "head"
    extras: dict = field(default_factory=dict)

    def evaluates(self, layer: int, num_layers: int) -> bool:
        """Whether a decision is taken after block `layer` (the last layer never needs one)."""
        if self.decision == "never" or layer >= num_layers:
            return False
        if self.decision == "forced":
            return layer == self.min_layer
        if self.layers:
            return layer in self.layers
        return layer >= self.min_layer and (layer - self.min_layer) % self.stride == 0

    def evaluated_layers(self, num_layers: int) -> list[int]:
        return [l for l in range(1, num_layers + 1) if self.evaluates(l, num_layers)]

    def reads_previous_hidden(self) -> bool:
        """Whether a decision after layer l also reads layer l - 1's hidden state (cos_prev, norm_ratio)."""
        return self.decision not in ("probe", "forced", "never") and any(f in ("cos_prev", "norm_ratio") for f in self.features)

    def uses_head(self) -> bool:
        return self.head in ("full", "lowrank", "label") and any(f in HEAD_FEATURES for f in self.features)

    def threshold_at(self, layer: int, num_layers: int) -> float:
        """The threshold after block `layer`: per evaluated layer for probes, else the single one."""
        if self.layer_thresholds:
            return float(self.layer_thresholds[list(self.layers).index(layer)])
        return self.threshold

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> "ExitPolicy":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            check_policy_data(cls, data)
            policy = cls(**data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, RecursionError, ValueError) as exc:
            raise BundleError(f"{path}: not a valid exit policy ({str(exc).splitlines()[0]})") from None
        policy.validate()
        return policy

    def validate(self) -> None:
        check_policy_values(self)
        if self.decision not in ("classifier", "folded", "rule", "probe", "forced", "never"):
            raise BundleError(f"exit policy: unknown decision {self.decision!r}")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise BundleError(f"exit policy: unknown feature {unknown[0]!r}")
        if self.head not in ("full", "lowrank", "label", "none"):
            raise BundleError(f"exit policy: unknown head {self.head!r}")
        if self.answer not in ("head", "probe") or (self.answer == "probe") != (self.decision == "probe"):
            raise BundleError(f"exit policy: answer {self.answer!r} does not go with decision {self.decision!r}")
        if (self.head == "label" or self.decision == "probe") and not (self.label_token_ids and self.label_head_file):
            raise BundleError("exit policy: a label-word decision needs label_token_ids and label_head_file")
        if self.decision == "probe" and not (self.head_file and self.layers
                                             and len(self.layer_thresholds) == len(self.layers)):
            raise BundleError("exit policy: decision probe needs head_file, layers and one threshold per layer")
        if self.min_layer < 1 or self.stride < 1:
            raise BundleError("exit policy: min_layer and stride must be >= 1")

    @staticmethod
    def forced(layer: int) -> "ExitPolicy":
        """Always stop after block `layer`: isolates the cost of running fewer blocks."""
        return ExitPolicy(decision="forced", features=[], threshold=0.0, head="none", min_layer=layer, name=f"forced@{layer}")

    @staticmethod
    def never() -> "ExitPolicy":
        return ExitPolicy(decision="never", features=[], threshold=float("inf"), head="none", name="full")

    @staticmethod
    def rule(threshold: float = 0.8, feature: str = "gap") -> "ExitPolicy":
        """The paper's fixed rule: stop when gap >= 0.8."""
        return ExitPolicy(decision="rule", features=[feature], threshold=threshold, head="full", name=f"{feature}>={threshold}")


@dataclass
class Decision:
    stop: bool
    token: Optional[np.ndarray]
    score: float


def decision_from(score, threshold: float, token) -> Decision:
    """The one exit rule, for every decider and backend: stop when the (first row's) score reaches
    the threshold. Batches decide on their first row: early exit generates one sequence at a time."""
    first = float(np.asarray(score, dtype=np.float64).reshape(-1)[0])
    return Decision(stop=bool(first >= threshold), token=token, score=first)


def hidden_features(current: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos_prev and norm_ratio between two (rows, hidden) arrays of consecutive layers."""
    current = current.astype(np.float64)
    previous = previous.astype(np.float64)
    cur_norm = np.linalg.norm(current, axis=-1)
    prev_norm = np.linalg.norm(previous, axis=-1)
    cos = (current * previous).sum(-1) / np.maximum(cur_norm * prev_norm, 1e-12)
    return cos.astype(np.float32), (cur_norm / np.maximum(prev_norm, 1e-12)).astype(np.float32)


def feature_matrix(policy_features, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Stack the named feature columns (each (rows,)) into the classifier's (rows, k) float32 input."""
    return np.stack([np.asarray(columns[f], dtype=np.float32) for f in policy_features], axis=-1)
