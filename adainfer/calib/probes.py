"""Internal classifiers (DeeBERT-style exits): one linear model per layer on the last position's
hidden state, giving an answer among the label words and a confidence.

Each probe is scikit-learn's `StandardScaler` + `LogisticRegression`; for the runtime the scaler
is folded into the weights and all probes are stacked into one ONNX graph of plain ops
(Gather the layer's weights, MatMul, Add, Softmax, ReduceMax / ArgMax) that TensorRT could run.
`--label final` trains them on the full model's answer (fidelity); `--label gold` on the gold
label (the bundle then answers with the probe, not with the model).

Per-layer thresholds: for a required precision p, a layer's threshold is the lowest confidence
above which the probe's held-out answers are right with a lower confidence bound (Wilson, z)
of at least p; layers that never reach it are not evaluated. p is then swept, the whole cascade
simulated on the held-out rows, and the cheapest p whose cascade meets the goal (again with the
lower bound, not the point estimate: small splits make "max saving at the target" noisy) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from .features import FeatureTable, softmax

#: logit given to a label a probe never saw in training (its probability is then ~0)
ABSENT = -1.0e4


@dataclass
class Probes:
    layers: list[int]  # 1-based layers with a probe
    weight: np.ndarray  # (E, hidden, k) float32, scaler folded in
    bias: np.ndarray  # (E, k) float32
    pipelines: list  # the scikit-learn models (None for a layer whose training labels were one class)
    label: str  # "final" or "gold"
    num_labels: int

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(N, E, k) folded-probe logits of hidden states (N, L, hidden)."""
        h = hidden[:, [l - 1 for l in self.layers]].astype(np.float64)
        return np.einsum("neh,ehk->nek", h, self.weight.astype(np.float64)) + self.bias[None].astype(np.float64)

    def sklearn_proba(self, hidden: np.ndarray) -> np.ndarray:
        """(N, E, k) scikit-learn's own probabilities, mapped onto the k labels."""
        out = np.zeros((len(hidden), len(self.layers), self.num_labels))
        for e, (layer, pipe) in enumerate(zip(self.layers, self.pipelines)):
            if pipe is None:
                out[:, e] = softmax(self.bias[e][None])[0]
                continue
            out[:, e][:, pipe.classes_] = pipe.predict_proba(hidden[:, layer - 1].astype(np.float32))
        return out


def fit_probes(table: FeatureTable, label: str, layers: list[int], c: float = 0.1, seed: int = 0) -> Probes:
    """One logistic regression per layer on the kept hidden states of `table` (classification)."""
    hidden = table.hidden
    target = (table.final if label == "final" else table.gold)
    if table.hidden_rows is not None:
        target = target[table.hidden_rows]
    k = len(table.label_token_ids)
    size = hidden.shape[-1]
    weight = np.zeros((len(layers), size, k), np.float64)
    bias = np.full((len(layers), k), ABSENT, np.float64)
    pipes = []
    for e, layer in enumerate(layers):
        classes = np.unique(target)
        if len(classes) < 2:
            bias[e, classes[0]] = 0.0
            pipes.append(None)
            continue
        pipe = Pipeline([("scale", StandardScaler()),
                         ("clf", LogisticRegression(C=c, max_iter=3000, random_state=seed))])
        pipe.fit(hidden[:, layer - 1].astype(np.float32), target)
        scaler, clf = pipe.named_steps["scale"], pipe.named_steps["clf"]
        coef = clf.coef_ / scaler.scale_[None]  # (c or 1, hidden)
        intercept = clf.intercept_ - coef @ scaler.mean_
        cls = clf.classes_
        if len(cls) == 2:  # binary: decision z is the log-odds of classes_[1]; softmax([0, z]) = sigmoid(z)
            weight[e, :, cls[1]] = coef[0]
            bias[e, cls[1]] = intercept[0]
            bias[e, cls[0]] = 0.0
        else:  # multinomial: predict_proba = softmax(decision_function)
            weight[e][:, cls] = coef.T
            bias[e, cls] = intercept
        pipes.append(pipe)
    return Probes(list(layers), weight.astype(np.float32), bias.astype(np.float32), pipes, label, k)


def answers_and_confidence(probes: Probes, table: FeatureTable) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) label index and confidence of each layer's probe (confidence -inf where there is none)."""
    n, L = len(table.gap), table.num_layers
    probs = softmax(probes.logits(table.hidden))
    answers = np.tile(table.pred[:, -1:], (1, L))
    conf = np.full((n, L), -np.inf)
    for e, layer in enumerate(probes.layers):
        answers[:, layer - 1] = probs[:, e].argmax(-1)
        conf[:, layer - 1] = probs[:, e].max(-1)
    answers[:, -1] = table.pred[:, -1]  # full depth answers with the model itself
    return answers, conf


def write_graph(probes: Probes, label_token_ids, out: Path, opset: int = 17) -> None:
    """hidden_states (rows, hidden), probe_index (1,) -> logits, confidence, answer, top1_id:
    the probe of the probe_index-th evaluated layer, as Gather + MatMul + Add + Softmax."""
    E, size, k = probes.weight.shape
    inits = [numpy_helper.from_array(probes.weight, "probe_weight"), numpy_helper.from_array(probes.bias, "probe_bias"),
             numpy_helper.from_array(np.asarray(label_token_ids, np.int64), "label_token_ids"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [
        helper.make_node("Gather", ["probe_weight", "probe_index"], ["w1"], axis=0),  # (1, hidden, k)
        helper.make_node("Squeeze", ["w1", "axis0"], ["w"]),
        helper.make_node("Gather", ["probe_bias", "probe_index"], ["b"], axis=0),  # (1, k)
        helper.make_node("MatMul", ["hidden_states", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("ReduceMax", ["probs"], ["confidence"], keepdims=0, axes=[-1]),
        helper.make_node("ArgMax", ["probs"], ["answer"], axis=-1, keepdims=0),
        helper.make_node("Gather", ["label_token_ids", "answer"], ["top1_id"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "probes",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["rows", size]),
         helper.make_tensor_value_info("probe_index", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", k]),
         helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["rows"]),
         helper.make_tensor_value_info("answer", TensorProto.INT64, ["rows"]),
         helper.make_tensor_value_info("top1_id", TensorProto.INT64, ["rows"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out))


def wilson_lower(successes: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    """Lower end of the Wilson score interval (0 where n = 0)."""
    n = np.asarray(n, np.float64)
    p = np.divide(successes, n, out=np.zeros_like(n), where=n > 0)
    denom = 1 + z * z / np.maximum(n, 1)
    centre = p + z * z / (2 * np.maximum(n, 1))
    spread = z * np.sqrt(p * (1 - p) / np.maximum(n, 1) + z * z / (4 * np.maximum(n, 1) ** 2))
    return np.where(n > 0, (centre - spread) / denom, 0.0)


#: thresholds fall between confidences at least this far apart (float32 graph vs float64 scikit-learn)
SEPARATION = 1e-4

#: a threshold above any probability: the layer never fires
NEVER = 2.0


def layer_thresholds(conf: np.ndarray, right: np.ndarray, precision: float, z: float, min_rows: int = 8) -> float:
    """Lowest confidence t such that the rows with confidence >= t are right with lower bound >= precision."""
    order = np.argsort(-conf)
    c, r = conf[order], right[order].astype(np.float64)
    hits, n = np.cumsum(r), np.arange(1, len(r) + 1)
    ok = (wilson_lower(hits, n, z) >= precision) & (n >= min_rows)
    # only cut between distinct confidences, so that the threshold means the same set in float32
    distinct = np.append(c[1:] < c[:-1] - SEPARATION, True)
    ok &= distinct
    if not ok.any():
        return NEVER
    last = np.nonzero(ok)[0].max()
    below = c[last + 1] if last + 1 < len(c) else c[last] - 1e-3
    return float((c[last] + below) / 2)
