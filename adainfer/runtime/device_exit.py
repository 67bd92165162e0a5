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
refuses them (`DeviceDecisionError`); the ORT GPU backends run them with `ExitDecider` on the
host instead (see ort_gpu.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..engines.errors import DeviceDecisionError
from ..engines.metadata import DECIDER
from .early_exit import Decision
from .exit_policy import HEAD_FEATURES, ExitPolicy

HEAD_OUTPUT = {"gap": "gap", "top_prob": "top1_prob"}


def classifier_refusal(policy: ExitPolicy, backend: str = "tensorrt") -> DeviceDecisionError:
    return DeviceDecisionError(
        f"exit policy {policy.name or 'of this bundle'!r} scores with {policy.classifier_file or 'classifier.onnx'} "
        f"(ONNX-ML ops, which TensorRT cannot run) so it cannot decide on the {backend} backend: calibrate again with a "
        f"linear classifier (logreg or svm-linear, folded into exit_head_folded.onnx), or use --backend onnxruntime or ort-cuda")


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
                                      f"use --backend onnxruntime")
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
        return Decision(stop=bool(score[0] >= p.threshold), token=token, score=float(score[0]))


def device_decider(decider, num_layers: int, backend: str = "tensorrt") -> Optional[DeviceDecider]:
    """A DeviceDecider for what `run_layers` was given: None, a DeviceDecider, an ExitDecider or an ExitPolicy."""
    if decider is None or isinstance(decider, DeviceDecider):
        return decider
    policy = decider if isinstance(decider, ExitPolicy) else decider.policy
    return DeviceDecider(policy, num_layers, backend)


def run_blocks(num_layers: int, run_block: Callable[[int], None], decide: Callable[[int, DeviceDecider], dict],
               decider: Optional[DeviceDecider], first: int = 1) -> tuple[int, int, Optional[Decision]]:
    """Run blocks `first`..L (1-based) through `run_block`; after each evaluated one ask `decide`
    (run the decision graph on the device, return its outputs copied to the host). Returns
    (exit layer, decisions taken, the stopping decision or None)."""
    decisions = 0
    for layer in range(first, num_layers + 1):
        run_block(layer)
        if decider is not None and decider.evaluates(layer):
            decisions += 1
            outputs = decide(layer, decider) if decider.graph is not None else {}
            decision = decider.decide_outputs(layer, outputs)
            if decision.stop:
                return layer, decisions, decision
    return num_layers, decisions, None
