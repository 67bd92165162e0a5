"""The full step's KV cache appended in place: no copy of the cache per token.

A block graph's `present_*` is `past + this step's keys and values`. Run plainly, every step
allocates new arrays and copies the whole cache into them (O(context) bytes per layer per token:
~3.7 MB a token on SmolLM2 at 80 positions, ~94 MB at 2,048). ONNX Runtime's GroupQueryAttention
instead appends into the past buffer itself when `past_*` and `present_*` are bound to the same
memory of `capacity` positions (its "past-present share buffer" mode, which onnxruntime-genai
uses; the attention reads the valid length from the mask, not from the buffer). `InPlaceKV` keeps
those buffers for one cache and an I/O binding of the full step's session on them, so a step binds
only the token ids, positions and mask.

The cache's per-layer arrays stay what the rest of the runtime reads (`HostKVCache.keys` /
`values`): after a full step they are views of the buffers; a step that ran elsewhere (blocks of an
early exit, a kv fill, a rollback) replaces them, and the next full step copies them back in.
Used only where every `present_*` of the graph comes from GroupQueryAttention (`supports`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .onnx_refs import producers

START_CAPACITY = 256


def supports(graph_path: Path, layers: int) -> bool:
    """Whether every layer's `present_key_NN` / `present_value_NN` of the graph is written by GroupQueryAttention."""
    made_by = producers(graph_path)
    return all(made_by.get(f"present_{kv}_{i:02d}") == "GroupQueryAttention"
               for i in range(layers) for kv in ("key", "value"))


class InPlaceKV:
    """Per layer a key and a value buffer `(batch, kv_heads, capacity, head_dim)` owned by one cache, and an
    I/O binding of the full step's session reading and writing them."""

    def __init__(self, session, layers: int, batch: int, kv_heads: int, head_dim: int, dtype, max_positions: int):
        self.session, self.layers = session, layers
        self.shape = (batch, kv_heads, head_dim)
        self.dtype, self.max_positions = np.dtype(dtype), max_positions
        self.capacity = 0
        self.buffers: tuple[list, list] = ([], [])  # keys, values
        self.views: tuple[list, list] = ([None] * layers, [None] * layers)  # what the cache held after our last step
        self.binding = session.io_binding()

    def run(self, cache, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One full step on `cache` (its mask already holds this step): last-position logits; the cache's
        arrays become views of the buffers, `total` positions long."""
        total = cache.length
        if total > self.capacity:
            self._grow(total)
        self._take(cache)
        b = self.binding
        b.bind_cpu_input("input_ids", input_ids)
        b.bind_cpu_input("position_ids", position_ids)
        b.bind_cpu_input("attention_mask", cache.attention_mask)
        self.session.run_with_iobinding(b)
        logits = np.array(b.get_outputs()[0].numpy())  # a copy: the bound output's memory is reused by the next run
        for kind, arrays in enumerate((cache.keys, cache.values)):
            for layer in range(self.layers):
                arrays[layer] = self.views[kind][layer] = self.buffers[kind][layer][:, :, :total]
        return logits

    def _take(self, cache) -> None:
        """Copy into the buffers every layer the cache changed since our last step (or never gave us)."""
        for kind, arrays in enumerate((cache.keys, cache.values)):
            for layer in range(self.layers):
                array = arrays[layer]
                if array is not self.views[kind][layer]:
                    self.buffers[kind][layer][:, :, :array.shape[2]] = array

    def _grow(self, total: int) -> None:
        if total > self.max_positions:
            raise InputError(f"context of {total} positions exceeds the model's {self.max_positions}")
        capacity = min(self.max_positions, max(2 * self.capacity, total, START_CAPACITY))
        batch, heads, dim = self.shape
        shape = [batch, heads, capacity, dim]
        self.buffers = tuple([np.zeros(shape, dtype=self.dtype) for _ in range(self.layers)] for _ in range(2))
        self.views = ([None] * self.layers, [None] * self.layers)  # `_take` copies the whole cache in
        self.capacity = capacity
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_output("logits", "cpu")  # first: `run` reads output 0
        kind_type = self.dtype.type
        for kind, name in enumerate(("key", "value")):
            for layer, buffer in enumerate(self.buffers[kind]):
                ptr = buffer.ctypes.data
                b.bind_input(f"past_{name}_{layer:02d}", "cpu", 0, kind_type, shape, ptr)
                b.bind_output(f"present_{name}_{layer:02d}", "cpu", 0, kind_type, shape, ptr)
