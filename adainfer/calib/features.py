"""Record, for every layer and every evaluated position, what an exit decision could look at.

One full-depth pass per example gives every layer's hidden state at every position (the
chain is causal, so a position's layer-l state equals what a prefix forward that stops at
layer l computes). The heads then run batched over layers and positions, in chunks of rows
small enough that a (rows, vocabulary) array stays a few hundred MB: nothing of size
positions x layers x vocabulary is ever held. What is kept per position and layer is a few
numbers (gap, top prob, top-1 of the full head; of the low-rank head; the label words' logits)
and, for the rows that need them (classification: every prompt's last position; text: a
bounded sample), the hidden states themselves.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..runtime.early_exit import trace
from ..runtime.exit_policy import hidden_features
from ..runtime.sessions import make_session
from .data import Dataset

#: rows per head call: keeps a (rows, vocabulary) float32 array near 256 MB
HEAD_CHUNK_BYTES = 1 << 28


@dataclass
class FeatureTable:
    """Arrays over N evaluated positions (rows) and L layers (columns, layer l at index l - 1)."""

    gap: np.ndarray  # (N, L) of the full exit head
    top_prob: np.ndarray  # (N, L)
    cos_prev: np.ndarray  # (N, L)
    norm_ratio: np.ndarray  # (N, L)
    pred: np.ndarray  # (N, L) top-1 (text) or label index (classification) per layer
    gold: np.ndarray  # (N,) gold next token or gold label index
    doc_id: np.ndarray  # (N,)
    context: np.ndarray  # (N,) tokens up to and including the position
    hidden: Optional[np.ndarray]  # (M, L, hidden) float32 of the rows `hidden_rows` (may be None)
    task: str
    hidden_rows: Optional[np.ndarray] = None  # (M,) row indices of `hidden` (None: every row)
    label_logits: Optional[np.ndarray] = None  # (N, L, labels) classification: the label words' logits
    lowrank_gap: Optional[np.ndarray] = None  # (N, L) of the low-rank head, when one was given
    lowrank_top_prob: Optional[np.ndarray] = None
    label_token_ids: tuple = ()

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
        """The rows selected by a boolean mask or an index array (hidden states follow)."""
        index = np.nonzero(rows)[0] if np.asarray(rows).dtype == bool else np.asarray(rows)
        out = {}
        n = len(self.gap)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("hidden", "hidden_rows"):
                continue
            out[f.name] = v[index] if isinstance(v, np.ndarray) and v.shape[:1] == (n,) else v
        if self.hidden is not None:
            have = np.arange(n) if self.hidden_rows is None else self.hidden_rows
            where = {int(r): i for i, r in enumerate(have)}
            pairs = [(new, where[int(r)]) for new, r in enumerate(index) if int(r) in where]
            out["hidden"] = self.hidden[[p[1] for p in pairs]]
            out["hidden_rows"] = None if len(pairs) == len(index) else np.array([p[0] for p in pairs], np.int64)
        return FeatureTable(**out)

    def with_head(self, head: str) -> "FeatureTable":
        """The table whose gap / top prob are those of another head: "full", "lowrank" or "label"."""
        if head == "full":
            return self
        if head == "lowrank":
            return replace(self, gap=self.lowrank_gap, top_prob=self.lowrank_top_prob)
        if head == "label":
            probs = softmax(self.label_logits)
            top = np.sort(probs, axis=-1)
            return replace(self, gap=(top[..., -1] - top[..., -2]).astype(np.float32),
                           top_prob=top[..., -1].astype(np.float32))
        raise ValueError(head)

    def hidden_table(self) -> "FeatureTable":
        """The rows whose hidden states were kept."""
        if self.hidden_rows is None:
            return self
        return self.subset(self.hidden_rows)

    def save(self, path) -> None:
        np.savez_compressed(path, **{k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)},
                            task=np.array(self.task))

    def labels(self, kind: str) -> np.ndarray:
        """(N, L) booleans: 'final' = the layer's answer equals the full model's; 'gold' = equals the gold answer."""
        target = self.final if kind == "final" else self.gold
        return self.pred == target[:, None]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def peak_memory_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Heads:
    """Runs the exit head (and the low-rank / label heads) over many rows, in bounded chunks."""

    def __init__(self, model, lowrank_head: Optional[Path], label_head: Optional[Path]):
        self.model = model
        self.chunk = max(1, HEAD_CHUNK_BYTES // (4 * model.manifest.vocab_size))
        self.lowrank = make_session(lowrank_head) if lowrank_head else None
        self.label = make_session(label_head) if label_head else None

    def run(self, h: np.ndarray) -> dict[str, np.ndarray]:
        parts: dict[str, list] = {}
        for start in range(0, len(h), self.chunk):
            x = np.ascontiguousarray(h[start:start + self.chunk], dtype=np.float32)
            top1, prob, gap = self.model.exit_features(x)
            got = {"top1": top1, "top_prob": prob, "gap": gap}
            if self.lowrank is not None:
                _, got["lowrank_top_prob"], got["lowrank_gap"] = self.lowrank.run(["top1_id", "top1_prob", "gap"],
                                                                                  {"hidden_states": x})
            if self.label is not None:
                (got["label_logits"],) = self.label.run(["label_logits"], {"hidden_states": x})
            for k, v in got.items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}


def collect(model, dataset: Dataset, *, keep_hidden: bool = True, progress: bool = True,
            max_positions_per_doc: Optional[int] = None, hidden_positions_per_doc: Optional[int] = None,
            lowrank_head: Optional[Path] = None, label_head: Optional[Path] = None, seed: int = 0) -> FeatureTable:
    """Run the bundle over `dataset` and record per-layer features of the evaluated positions.

    Classification needs `label_head` (final norm + the label words' LM-head columns): the
    answer at each layer is the label word with the highest logit. Hidden states are kept
    (float32) for every classification prompt and, for text, for at most
    `hidden_positions_per_doc` random positions per document (every position if None)."""
    L = model.num_layers
    if dataset.is_classification and label_head is None:
        raise ValueError("classification features need the label head")
    heads = _Heads(model, lowrank_head, label_head)
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {}
    hidden_parts, hidden_rows = [], []
    row_count = 0
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
        h = np.stack([layers[l][positions] for l in range(L + 1)], axis=1).astype(np.float32)  # (rows, L+1, hidden)
        del layers
        cos, ratio = hidden_features(h[:, 1:].reshape(-1, h.shape[-1]), h[:, :-1].reshape(-1, h.shape[-1]))
        got = heads.run(h[:, 1:].reshape(-1, h.shape[-1]))
        got = {k: v.reshape(rows, L, *v.shape[1:]) for k, v in got.items()}
        got["cos_prev"], got["norm_ratio"] = cos.reshape(rows, L), ratio.reshape(rows, L)
        got["pred"] = got["label_logits"].argmax(-1) if dataset.is_classification else got["top1"]
        del got["top1"]
        got.update(gold=gold, doc_id=np.full(rows, example.doc_id), context=positions + 1)
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
        if keep_hidden:
            keep = np.arange(rows)
            if hidden_positions_per_doc is not None and rows > hidden_positions_per_doc:
                keep = np.sort(rng.choice(rows, size=hidden_positions_per_doc, replace=False))
            hidden_parts.append(h[keep, 1:])
            hidden_rows.append(row_count + keep)
        row_count += rows
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    hidden = np.concatenate(hidden_parts) if hidden_parts else None
    rows_kept = np.concatenate(hidden_rows) if hidden_rows else None
    if rows_kept is not None and len(rows_kept) == row_count:
        rows_kept = None
    return FeatureTable(
        gap=arrays["gap"], top_prob=arrays["top_prob"], cos_prev=arrays["cos_prev"], norm_ratio=arrays["norm_ratio"],
        pred=arrays["pred"].astype(np.int64), gold=arrays["gold"], doc_id=arrays["doc_id"], context=arrays["context"],
        hidden=hidden, hidden_rows=rows_kept, task=dataset.task, label_logits=arrays.get("label_logits"),
        lowrank_gap=arrays.get("lowrank_gap"), lowrank_top_prob=arrays.get("lowrank_top_prob"),
        label_token_ids=tuple(dataset.label_token_ids))
