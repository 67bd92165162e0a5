"""The backend interface: what the one chain (`chain.py`) and the decoders (`decoding.py`) ask of a runtime.

A backend runs a bundle's graphs somewhere (ONNX Runtime on the CPU, ONNX Runtime with I/O
binding on the CPU or a CUDA device, TensorRT engines) and keeps the KV cache where its graphs
read it. It never loops over layers itself: `chain.run_layers` / `chain.fill_skipped` do, once,
for every backend. Hidden states are opaque handles (numpy arrays on the CPU backend, device
tensors elsewhere) that only the backend that made them reads; `host` copies one to numpy.

A KV cache holds, per layer, exactly what the block graph's `past_key` / `past_value` take and
`present_key` / `present_value` give (shape `(batch, kv_heads, length, head_dim)`, dtype read from
the manifest: float32, float16, or int8 for an int8-KV export), plus the padding mask and the
next position of every row. `fork` gives an independent copy (speculative drafts), `truncate`
rolls it back (rejected drafts), `close` releases device memory now rather than at collection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

from ..manifest import Manifest


def kv_dtype(manifest: Manifest) -> np.dtype:
    """The dtype of the block graphs' KV cache, as the manifest records `past_key` of block 0."""
    if manifest.num_layers == 0:
        return np.dtype(np.float32)
    spec = next(t for t in manifest.graphs[manifest.block_name(0)].inputs if t.name == "past_key")
    return np.dtype(spec.dtype)


def graph_dtype(manifest: Manifest, graph: str, tensor: str) -> np.dtype:
    """The dtype the manifest records for one input or output of one graph."""
    spec = manifest.graphs[graph]
    return np.dtype(next(t for t in (*spec.inputs, *spec.outputs) if t.name == tensor).dtype)


class KVState:
    """What every KV cache carries besides the keys and values: the (batch, length) padding mask
    and each row's next position (position ids count real tokens only)."""

    attention_mask: np.ndarray
    next_position: np.ndarray
    complete_layers: Optional[int]

    def _init_state(self, batch: int) -> None:
        self.attention_mask = np.zeros((batch, 0), dtype=np.int64)
        self.next_position = np.zeros(batch, dtype=np.int64)
        self.complete_layers = None  # < num_layers after an early exit, until the skipped layers are filled
        self.unpadded = True  # whether the mask is all ones (kept here: a decode step would otherwise scan it)

    @property
    def batch(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def advance(self, step_mask: Optional[np.ndarray], new: int = 1) -> np.ndarray:
        """Append a step's padding mask (batch, seq), or None for `new` real tokens per row (a decode step: fewer
        numpy calls, each ~10-20 us after a graph run has evicted the caches); returns its position ids, which
        count real tokens only."""
        if step_mask is None:
            batch = self.next_position.shape[0]
            self.attention_mask = np.concatenate([self.attention_mask, np.ones((batch, new), np.int64)], axis=1)
            position_ids = self.next_position[:, None] + (np.arange(new, dtype=np.int64) if new > 1 else 0)
            self.next_position = self.next_position + new
            return position_ids
        self.attention_mask = np.concatenate([self.attention_mask, step_mask], axis=1)
        position_ids = np.maximum(self.next_position[:, None] + np.cumsum(step_mask, axis=1) - 1, 0).astype(np.int64)
        self.next_position = self.next_position + step_mask.sum(axis=1)
        self.unpadded = self.unpadded and bool(step_mask.all())
        return position_ids

    def _copy_state_to(self, other: "KVState") -> None:
        other.attention_mask = self.attention_mask.copy()
        other.next_position = self.next_position.copy()
        other.complete_layers = self.complete_layers
        other.unpadded = self.unpadded

    def _truncate_state(self, length: int) -> None:
        removed = self.attention_mask[:, length:].sum(axis=1)
        self.attention_mask = self.attention_mask[:, :length]
        self.next_position = self.next_position - removed
        self.unpadded = bool(self.attention_mask.all())


class KVCache(Protocol):
    attention_mask: np.ndarray
    next_position: np.ndarray
    complete_layers: Optional[int]
    unpadded: bool

    @property
    def length(self) -> int: ...

    def advance(self, step_mask: Optional[np.ndarray], new: int = 1) -> np.ndarray: ...

    def fork(self) -> "KVCache": ...

    def truncate(self, length: int) -> None: ...

    def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer `index`'s keys and values as host arrays (for tests and tools)."""

    def close(self) -> None: ...


class Backend(Protocol):
    """One runtime for a bundle's graphs. Layers are 0-based here; `chain` counts blocks from 1."""

    name: str
    manifest: Manifest
    num_layers: int
    has_kv_fill: bool

    def new_cache(self, batch: int) -> KVCache: ...

    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: KVCache) -> Any: ...

    #: (first, last) block ranges (0-based, inclusive) this backend runs as one graph (`segment`); may be empty
    spans: tuple

    def block(self, layer: int, hidden: Any, position_ids: np.ndarray, cache: KVCache) -> Any:
        """Run block `layer` on `hidden` and append this step's keys and values to the cache."""

    def segment(self, first: int, last: int, hidden: Any, position_ids: np.ndarray, cache: KVCache) -> Any:
        """Run blocks `first..last` on `hidden`, appending each one's keys and values to its layer's cache:
        one block (`first == last`) or one of `spans`."""

    #: whether `full_step` runs (the bundle has a full-step graph and the backend uses it); optional, False if absent
    runs_full_step: bool

    def full_step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Embedding, every block and the final head as one graph: last-position logits (batch, vocab) on the
        host, every layer's keys and values appended (`chain.full_depth_logits`)."""

    def kv_fill(self, layer: int, hidden: Any, position_ids: np.ndarray, cache: KVCache) -> None:
        """Append to layer `layer` the keys and values its `kv_fill` graph gives for `hidden`
        (the exit hidden state of a token that skipped the layer)."""

    def kv_fill_span(self, first: int, last: int, hidden: Any, position_ids: np.ndarray, cache: KVCache) -> bool:
        """Optional: `kv_fill` of layers first..last in one call, where the backend runs a merged kv fill graph of
        them (`Manifest.fill_spans`); False where it does not (`chain.fill_skipped` then fills layer by layer)."""

    def rows(self, hidden: Any, which: str = "last") -> Any:
        """(rows, hidden) for the heads: the last position of every batch row (`"last"`), or every
        position of a batch of one (`"all"`)."""

    def logits(self, rows: Any) -> np.ndarray: ...

    def exit_outputs(self, rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top-1 id, top-1 prob, gap) of the exit head, as host arrays."""

    def host(self, tensor: Any) -> np.ndarray: ...

    def decide(self, decider: Any, layer: int, hidden: Any, previous: Any) -> Any:
        """The exit decision after block `layer` (1-based) on `hidden`, `previous` the block before's."""

    def make_decider(self, model: Any, policy: Any) -> Any: ...

    def close(self) -> None: ...


@dataclass
class LayerRun:
    """Where a pass through the blocks ended: hidden states (batch, seq, hidden) after `exit_layer`
    (a backend handle: `backend.host(hidden)` for numpy)."""

    hidden: Any
    position_ids: np.ndarray
    exit_layer: int
    decisions: int
    token: Optional[np.ndarray]  # top-1 ids from the exit decision when it stopped, else None
