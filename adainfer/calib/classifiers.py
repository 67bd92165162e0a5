"""The exit classifiers (AdaInfer's SVM, and what we compare it with) and their ONNX form.

Every classifier maps a (rows, k) feature matrix to a score; the policy stops when the score
reaches a threshold picked on held-out data. Scores are `decision_function` values (signed
distance for SVMs, log-odds for logistic regression), so a linear one folds into MatMul/Add.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from ..errors import AdainferError

FEATURE_SETS = {
    "paper": ["gap", "top_prob"],
    "extended": ["gap", "top_prob", "layer_frac", "cos_prev", "norm_ratio"],
    "hidden": ["layer_frac", "cos_prev", "norm_ratio"],
}

#: rows used to fit each kind (an RBF SVM's cost grows with the square of its training set)
MAX_TRAIN_ROWS = {"svm-linear": 20000, "svm-rbf": 3000, "logreg": 20000}


def make(kind: str) -> Pipeline:
    if kind == "svm-linear":
        last = LinearSVC(C=1.0, class_weight="balanced", max_iter=5000)
    elif kind == "svm-rbf":
        last = SVC(kernel="rbf", C=1.0, gamma="scale", class_weight="balanced")
    elif kind == "logreg":
        last = LogisticRegression(class_weight="balanced", max_iter=2000)
    else:
        raise AdainferError(f"unknown classifier {kind!r}; choose svm-linear, svm-rbf, logreg")
    return Pipeline([("scale", StandardScaler()), ("clf", last)])


@dataclass
class Fitted:
    kind: str
    features: list[str]
    pipeline: Optional[Pipeline]  # None for the fixed rule and for a constant
    constant: Optional[float] = None  # when the calibration labels were all one class

    def score(self, x: np.ndarray) -> np.ndarray:
        if self.constant is not None:
            return np.full(len(x), self.constant)
        if self.pipeline is None:
            return x[:, 0].astype(np.float64)
        return self.pipeline.decision_function(x.astype(np.float32))

    @property
    def is_linear(self) -> bool:
        return self.kind in ("svm-linear", "logreg", "constant")

    def linear_form(self) -> tuple[np.ndarray, float]:
        """(weights, bias) on raw features: the scaler folded into the linear model."""
        if self.constant is not None:
            return np.zeros(len(self.features)), self.constant
        scaler, clf = self.pipeline.named_steps["scale"], self.pipeline.named_steps["clf"]
        w = clf.coef_.reshape(-1) / scaler.scale_
        b = float(clf.intercept_.reshape(-1)[0] - np.sum(w * scaler.mean_))
        return w, b

    def macs(self) -> int:
        """Multiply-accumulates of one decision (the scaler and the model)."""
        k = len(self.features)
        if self.pipeline is None:
            return 0
        if self.kind == "svm-rbf":
            return 2 * k + self.pipeline.named_steps["clf"].support_vectors_.shape[0] * (k + 1)
        return 2 * k


def fit(kind: str, features: list[str], x: np.ndarray, y: np.ndarray, seed: int = 0) -> Fitted:
    if y.all() or not y.any():
        # every layer already agrees (or none does): the best classifier is a constant
        return Fitted("constant", features, None, constant=1.0 if y.all() else -1.0)
    limit = MAX_TRAIN_ROWS[kind]
    if len(y) > limit:
        rows = np.random.default_rng(seed).choice(len(y), size=limit, replace=False)
        x, y = x[rows], y[rows]
    pipeline = make(kind).fit(x.astype(np.float32), y)
    return Fitted(kind, features, pipeline)


def to_onnx(fitted: Fitted, out: Path, check_x: np.ndarray) -> dict:
    """Convert with skl2onnx (no ZipMap); find which output column carries the score and its sign,
    and check it against scikit-learn on `check_x`. Returns the policy fields for the runtime."""
    from skl2onnx import to_onnx as skl_to_onnx

    if fitted.constant is not None:  # no scikit-learn model: the same plain MatMul/Add graph as a folded head
        from .head_graphs import fold_linear

        fold_linear(None, Path(out), np.zeros(0), np.zeros(len(fitted.features)), fitted.constant)
        return {"score_output": 0, "score_column": 0, "score_sign": 1.0, "max_score_error": 0.0}
    clf = fitted.pipeline.named_steps["clf"]
    # decision scores as tensors, not probabilities in a ZipMap: LinearSVC accepts raw_scores only,
    # LogisticRegression raw_scores and zipmap, SVC zipmap (its second output is already the score)
    options = {"svm-linear": {"raw_scores": True}, "logreg": {"raw_scores": True, "zipmap": False},
               "svm-rbf": {"zipmap": False}}[fitted.kind]
    options = {id(clf): options}
    with warnings.catch_warnings():  # skl2onnx reads SVC's deprecated probA_/probB_ attributes
        warnings.simplefilter("ignore", FutureWarning)
        onx = skl_to_onnx(fitted.pipeline, check_x[:1].astype(np.float32), options=options,
                          target_opset={"": 17, "ai.onnx.ml": 3})
    Path(out).write_bytes(onx.SerializeToString())
    from ..runtime.sessions import make_session

    session = make_session(Path(out))
    outputs = session.run(None, {session.get_inputs()[0].name: check_x.astype(np.float32)})
    want = fitted.score(check_x)
    best = None
    for o_index, value in enumerate(outputs):
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            continue
        value = value.astype(np.float64)
        if value.ndim == 1:
            value = value[:, None]
        if value.ndim != 2 or value.shape[0] != len(want):
            continue
        for column in range(value.shape[1]):
            for sign in (1.0, -1.0):
                err = float(np.max(np.abs(sign * value[:, column] - want)))
                if best is None or err < best[0]:
                    best = (err, o_index, column, sign)
    if best is None or best[0] > 1e-3 * (1.0 + np.max(np.abs(want))):
        raise AdainferError(f"classifier.onnx does not reproduce scikit-learn's scores (error {best and best[0]:.3g})")
    return {"score_output": best[1], "score_column": best[2], "score_sign": best[3], "max_score_error": best[0]}
