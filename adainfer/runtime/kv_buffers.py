"""A KV cache in preallocated buffers bound by address: no copy of the cache through numpy per step.

Per layer and per keys / values two buffers (ping-pong): the cache of that layer lives compactly
as `(batch, kv_heads, length, head_dim)` in buffer `current[layer]`; a block reads it there as
`past_*` and writes `past + new` as `present_*` into the other buffer (the graphs concatenate
inside, as every block graph of a bundle does), which becomes current. Appending keys and values
that came from elsewhere (`kv_fill` after an early exit), rolling back (`truncate`) and copying
(`fork`) are strided copies (`copy_2d`) in the same memory. Capacity grows by doubling up to the
model's positions, so a short generation does not hold a full-context cache. The dtype is the
block graphs' (float32, float16, int8 for int8-KV exports).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .backend import KVState

START_CAPACITY = 256


class BufferKVCache(KVState):
    def __init__(self, memory, layers: int, batch: int, kv_heads: int, head_dim: int, dtype, max_capacity: int,
                 capacity: int = START_CAPACITY):
        self._init_state(batch)
        self.memory, self.layers, self.dtype = memory, layers, np.dtype(dtype)
        self.kv_shape = (batch, kv_heads, head_dim)
        self.unit = head_dim * self.dtype.itemsize  # bytes of one position of one (batch row, kv head)
        self.rows = batch * kv_heads
        self.max_capacity = max_capacity
        self.capacity = 0
        self.buffers: list = [[[None, None], [None, None]] for _ in range(layers)]  # [layer][key/value][0/1]
        self.current = [0] * layers
        self.lengths = [0] * layers
        self._grow(max(1, min(capacity, max_capacity)))

    # ------------------------------------------------------------------ addresses for the graphs

    def shape(self, length: int) -> tuple:
        batch, kv_heads, head_dim = self.kv_shape
        return (batch, kv_heads, length, head_dim)

    def past(self, layer: int) -> tuple[int, int, int]:
        """(keys address, values address, length) of layer `layer`'s cache."""
        cur = self.current[layer]
        keys, values = self.buffers[layer]
        return keys[cur].ptr, values[cur].ptr, self.lengths[layer]

    def present(self, layer: int, total: int) -> tuple[int, int]:
        """Where a block writes `total` positions of layer `layer` (the other buffer); call `commit` after."""
        self.reserve(total)
        other = 1 - self.current[layer]
        keys, values = self.buffers[layer]
        return keys[other].ptr, values[other].ptr

    def commit(self, layer: int, total: int) -> None:
        self.current[layer] = 1 - self.current[layer]
        self.lengths[layer] = total

    # ------------------------------------------------------------------ changes made here

    def append(self, layer: int, new_keys: int, new_values: int, seq: int) -> None:
        """Append `seq` positions, compact `(batch, kv_heads, seq, head_dim)` at the given addresses."""
        past = self.lengths[layer]
        total = past + seq
        dst_k, dst_v = self.present(layer, total)
        src_k, src_v, _ = self.past(layer)
        u, copy = self.unit, self.memory.copy_2d
        for dst, src, new in ((dst_k, src_k, new_keys), (dst_v, src_v, new_values)):
            if past:
                copy(dst, total * u, src, past * u, past * u, self.rows)
            copy(dst + past * u, total * u, new, seq * u, seq * u, self.rows)
        self.commit(layer, total)

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions of every layer (and of the mask)."""
        u, copy = self.unit, self.memory.copy_2d
        for layer in range(self.layers):
            old = self.lengths[layer]
            if old <= length:
                continue
            src_k, src_v, _ = self.past(layer)
            dst_k, dst_v = self.present(layer, length)
            for dst, src in ((dst_k, src_k), (dst_v, src_v)):
                copy(dst, length * u, src, old * u, length * u, self.rows)
            self.commit(layer, length)
        self._truncate_state(length)

    def fork(self) -> "BufferKVCache":
        other = BufferKVCache(self.memory, self.layers, self.kv_shape[0], self.kv_shape[1], self.kv_shape[2], self.dtype,
                              self.max_capacity, self.capacity)
        for layer in range(self.layers):
            src_k, src_v, length = self.past(layer)
            size = self.rows * length * self.unit
            keys, values = other.buffers[layer]
            if size:
                self.memory.copy_2d(keys[0].ptr, size, src_k, size, size, 1)
                self.memory.copy_2d(values[0].ptr, size, src_v, size, size, 1)
            other.lengths[layer] = length
        self._copy_state_to(other)
        return other

    def reserve(self, total: int) -> None:
        if total > self.capacity:
            if total > self.max_capacity:
                raise InputError(f"context of {total} positions exceeds the cache's {self.max_capacity}")
            self._grow(min(self.max_capacity, max(2 * self.capacity, total)))

    def _grow(self, capacity: int) -> None:
        nbytes = self.rows * capacity * self.unit
        for layer in range(self.layers):
            old = self.buffers[layer]
            new = [[self.memory.alloc(nbytes), self.memory.alloc(nbytes)] for _ in range(2)]
            if old[0][0] is not None:
                size = self.rows * self.lengths[layer] * self.unit
                cur = self.current[layer]
                for kind in range(2):
                    if size:
                        self.memory.copy_2d(new[kind][0].ptr, size, old[kind][cur].ptr, size, size, 1)
                    for buf in old[kind]:
                        buf.free()
            self.buffers[layer] = new
            self.current[layer] = 0
        self.capacity = capacity

    # ------------------------------------------------------------------ reading, releasing

    def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        k, v, length = self.past(index)
        self.memory.synchronize()
        out = []
        for ptr in (k, v):
            array = np.empty(self.shape(length), dtype=self.dtype)
            out.append(self.memory.download(ptr, array) if array.nbytes else array)
        return out[0], out[1]

    def close(self) -> None:
        for pairs in self.buffers:
            for pair in pairs:
                for buf in pair:
                    if buf is not None:
                        buf.free()
        self.buffers = [[[None, None], [None, None]] for _ in range(self.layers)]

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
