"""Record, for every layer and every evaluated position, what an exit decision could look at.

One full-depth pass per example gives every layer's hidden state at every position (the
chain is causal, so a position's layer-l state equals what a prefix forward that stops at
layer l computes). The exit head then gives gap, top prob and top-1 per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..runtime.early_exit import trace
from ..runtime.exit_policy import hidden_features
from .data import Dataset


@dataclass
class FeatureTable:
    """Arrays over N evaluated positions (rows) and L layers (columns, layer l at index l - 1)."""

    gap: np.ndarray  # (N, L)
    top_prob: np.ndarray  # (N, L)
    cos_prev: np.ndarray  # (N, L)
    norm_ratio: np.ndarray  # (N, L)
    pred: np.ndarray  # (N, L) top-1 (text) or label index (classification) per layer
    gold: np.ndarray  # (N,) gold next token or gold label index
    doc_id: np.ndarray  # (N,)
    context: np.ndarray  # (N,) tokens up to and including the position
    hidden: Optional[np.ndarray]  # (N, L, hidden) float32, kept for head variants (may be None)
    task: str

    @property
    def num_layers(self) -> int:
        return self.gap.shape[1]

    @property
    def final(self) -> np.ndarray:
        return self.pred[:, -1]

    def layer_frac(self) -> np.ndarray:
        L = self.num_layers
        return np.broadcast_to(np.arange(1, L + 1, dtype=np.float32) / L, self.gap.shape)

    def column(self, name: str) -> np.ndarray:
        return self.layer_frac() if name == "layer_frac" else getattr(self, name)

    def subset(self, rows: np.ndarray) -> "FeatureTable":
        return FeatureTable(**{k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})

    def save(self, path) -> None:
        np.savez_compressed(path, **{k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)},
                            task=np.array(self.task))

    def labels(self, kind: str) -> np.ndarray:
        """(N, L) booleans: 'final' = the layer's answer equals the full model's; 'gold' = equals the gold answer."""
        target = self.final if kind == "final" else self.gold
        return self.pred == target[:, None]


def collect(model, dataset: Dataset, *, keep_hidden: bool = True, progress: bool = True,
            max_positions_per_doc: Optional[int] = None) -> FeatureTable:
    """Run the bundle over `dataset` and record per-layer features of the evaluated positions."""
    L = model.num_layers
    parts: dict[str, list] = {k: [] for k in ("gap", "top_prob", "cos_prev", "norm_ratio", "pred", "gold",
                                               "doc_id", "context", "hidden")}
    label_ids = np.asarray(dataset.label_token_ids, dtype=np.int64)
    for example in tqdm(dataset.examples, desc="calib", unit="doc", disable=not progress):
        layers = trace(model, example.ids)
        if dataset.is_classification:
            positions = np.array([len(example.ids) - 1])
            gold = np.array([example.gold_label])
        else:
            positions = np.nonzero(np.asarray(example.targets) >= 0)[0]
            if max_positions_per_doc and len(positions) > max_positions_per_doc:
                positions = positions[np.linspace(0, len(positions) - 1, max_positions_per_doc).astype(int)]
            gold = np.asarray(example.targets)[positions]
        rows = len(positions)
        feats = {k: np.zeros((rows, L), np.float32) for k in ("gap", "top_prob", "cos_prev", "norm_ratio")}
        pred = np.zeros((rows, L), np.int64)
        for l in range(1, L + 1):
            h = np.ascontiguousarray(layers[l][positions], dtype=np.float32)
            top1, prob, gap = model.exit_features(h)
            feats["gap"][:, l - 1], feats["top_prob"][:, l - 1] = gap, prob
            feats["cos_prev"][:, l - 1], feats["norm_ratio"][:, l - 1] = hidden_features(h, layers[l - 1][positions])
            if dataset.is_classification:
                pred[:, l - 1] = model.final_logits(h)[:, label_ids].argmax(-1)
            else:
                pred[:, l - 1] = top1
        for k, v in feats.items():
            parts[k].append(v)
        parts["pred"].append(pred)
        parts["gold"].append(gold)
        parts["doc_id"].append(np.full(rows, example.doc_id))
        parts["context"].append(positions + 1)
        if keep_hidden:
            parts["hidden"].append(np.stack([layers[l][positions] for l in range(1, L + 1)], axis=1).astype(np.float32))
    arrays = {k: np.concatenate(v) for k, v in parts.items() if v}
    return FeatureTable(hidden=arrays.pop("hidden", None), task=dataset.task, **arrays)
