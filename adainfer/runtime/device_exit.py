"""Early-exit decisions for the GPU backends: features and score on the device, threshold on the host.

`DeviceDecider` is the host side of an `ExitPolicy` on a GPU backend. After each evaluated
block the backend runs the policy's graph on the last position's hidden state, which never
leaves the device, and hands `decide_outputs` the few values it copied back:

  decision "folded"  graph `exit_decider` (engines/decider.py: the folded exit head with
                     cos_prev / norm_ratio / layer_frac computed inside): `score` and, when the
                     head is the full one, `top1_id` -> 4 + 8 bytes per batch row and layer;
  decision "rule"    the exit head: its rule feature (gap or top1_prob) and `top1_id`;
  "forced" / "never" no graph, nothing copied.

Decisions equal `ExitDecider.decide` for a batch of one: stop when score[0] >= threshold; the
token is the exit head's top-1 only for head "full" (the low-rank head's top-1 is approximate).
Policies scored by `classifier.onnx` (ONNX-ML ops) cannot run in TensorRT: the tensorrt backend
refuses them (`DeviceDecisionError`); the ONNX Runtime backends run every policy with
`ExitDecider` on the host instead. The decider graph's tensor names and the layer-fraction table
live here, where the runtime reads them; `engines/decider.py` (build time) imports them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .engine_record import DECIDER
from .exit_policy import HEAD_FEATURES, Decision, ExitPolicy, decision_from
from .gpu_errors import DeviceDecisionError

HEAD_OUTPUT = {"gap": "gap", "top_prob": "top1_prob"}
HIDDEN, PREVIOUS, LAYER_FRAC = "hidden_states", "previous_hidden_states", "layer_frac"  # the decider graph's inputs


def extra_features(policy: ExitPolicy) -> list[str]:
    """The features the folded graph takes in `extra_features`, in column order (as ExitDecider.extra)."""
    return [f for f in policy.features if f not in HEAD_FEATURES]


def layer_fractions(num_layers: int, rows: int) -> np.ndarray:
    """(num_layers, rows, 1) float32: `layer_frac` of every layer (1-based l -> l / L), as the host computes it."""
    values = np.array([np.float32(l / num_layers) for l in range(1, num_layers + 1)], dtype=np.float32)
    return np.ascontiguousarray(np.repeat(values[:, None, None], rows, axis=1))


def classifier_refusal(policy: ExitPolicy, backend: str = "tensorrt") -> DeviceDecisionError:
    return DeviceDecisionError(
        f"exit policy {policy.name or 'of this bundle'!r} scores with {policy.classifier_file or 'classifier.onnx'} "
        f"(ONNX-ML ops, which TensorRT cannot run) so it cannot decide on the {backend} backend: calibrate again with a "
        f"linear classifier (logreg or svm-linear, folded into exit_head_folded.onnx), or use --backend cpu or ort-cuda")


class DeviceDecider:
    """The host side of an exit policy whose decision graph runs on the device."""

    def __init__(self, policy: ExitPolicy, num_layers: int, backend: str = "tensorrt"):
        policy.validate()
        self.policy, self.num_layers, self.backend = policy, num_layers, backend
        if policy.decision == "classifier":
            raise classifier_refusal(policy, backend)
        if policy.decision == "probe" or policy.head == "label" or policy.label_token_ids:
            raise DeviceDecisionError(f"exit policy {policy.name or 'of this bundle'!r} decides with label-word heads or "
                                      f"internal classifiers, which the {backend} backend does not run yet; "
                                      f"use --backend cpu")
        if policy.decision == "folded":
            self.graph: Optional[str] = DECIDER
            self.outputs = ["score", "top1_id"] if policy.head != "none" else ["score"]
        elif policy.decision == "rule":
            feature = policy.features[0] if policy.features else ""
            if feature not in HEAD_FEATURES or policy.head != "full":
                raise DeviceDecisionError(f"exit rule on {feature or 'no feature'!r} cannot run on the {backend} backend "
                                          f"(rules on the exit head's gap or top_prob can)")
            self.graph = "exit_head"
            self.outputs = [HEAD_OUTPUT[feature], "top1_id"]
        else:  # forced, never: nothing to compute
            self.graph = None
            self.outputs = []

    def evaluates(self, layer: int) -> bool:
        return self.policy.evaluates(layer, self.num_layers)

    def decide_outputs(self, layer: int, outputs: dict) -> Decision:
        """The decision after block `layer` from the graph's outputs (host arrays, one value per row)."""
        p = self.policy
        if p.decision == "forced":
            score = np.array([np.inf])
        elif p.decision == "folded":
            score = np.asarray(outputs["score"], dtype=np.float64).reshape(-1)
        else:
            score = np.asarray(outputs[HEAD_OUTPUT[p.features[0]]], dtype=np.float64).reshape(-1)
        token = outputs.get("top1_id") if p.head == "full" else None
        if token is not None:
            token = np.asarray(token).astype(np.int64).reshape(-1)
        return decision_from(score, p.threshold, token)


def device_decider(decider, num_layers: int, backend: str = "tensorrt") -> Optional[DeviceDecider]:
    """A DeviceDecider for what `run_layers` was given: None, a DeviceDecider, an ExitDecider or an ExitPolicy."""
    if decider is None or isinstance(decider, DeviceDecider):
        return decider
    policy = decider if isinstance(decider, ExitPolicy) else decider.policy
    return DeviceDecider(policy, num_layers, backend)
