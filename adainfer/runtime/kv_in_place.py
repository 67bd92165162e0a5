"""The KV cache appended in place by the graphs that run several blocks or one: no copy of the cache per token.

A block graph's `present_*` is `past + this step's keys and values`. Run plainly, every call
allocates new arrays and copies the whole cache of its layers into them (O(context) bytes per layer
per token: ~3.7 MB a token on SmolLM2 at 80 positions, ~94 MB at 2,048). ONNX Runtime's
GroupQueryAttention instead appends into the past buffer itself when `past_*` and `present_*` are
bound to the same memory of `capacity` positions (its "past-present share buffer" mode, which
onnxruntime-genai uses; the attention reads the valid length from the mask, not from the buffer).
`InPlaceKV` keeps those buffers for one cache (every layer) and one I/O binding per graph that ran on
them (the full step, a span of blocks, a single block), so a call binds only its own inputs
(token ids or hidden states, positions, mask).

The cache's per-layer arrays stay what the rest of the runtime reads (`HostKVCache.keys` /
`values`): after a call in place, the layers it ran are views of the buffers; a call that replaced
a layer's arrays elsewhere (a kv fill, a graph that cannot append in place) is copied back in by the
next call in place that runs that layer. Used only where every `present_*` of a graph comes from
GroupQueryAttention (`supports`).
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from .onnx_refs import producers

START_CAPACITY = 256


def suffixed(layer: int) -> tuple[str, str, str, str]:
    """A graph of several blocks (a span, the full step) names each layer's cache with its number."""
    return (f"past_key_{layer:02d}", f"past_value_{layer:02d}", f"present_key_{layer:02d}", f"present_value_{layer:02d}")


def plain(layer: int) -> tuple[str, str, str, str]:
    """A single block's graph names its cache without a number."""
    return ("past_key", "past_value", "present_key", "present_value")


def supports(graph_path: Path, layers: Sequence[int], names: Callable = suffixed) -> bool:
    """Whether every `present_key` / `present_value` of the graph's `layers` is written by GroupQueryAttention."""
    made_by = producers(graph_path)
    return all(made_by.get(name) == "GroupQueryAttention" for i in layers for name in names(i)[2:])


def _prefix_of(array: np.ndarray, buffer: np.ndarray) -> bool:
    """Whether `array` is `buffer[:, :, :n]` (what `truncate` leaves of our view): nothing to copy."""
    return (array.ctypes.data == buffer.ctypes.data and array.strides == buffer.strides
            and array.shape[:2] == buffer.shape[:2] and array.shape[3:] == buffer.shape[3:])


def _bound_outputs(binding) -> list:
    """The binding's outputs in binding order, each with `.numpy()`. `IOBinding.get_outputs` wraps every output in a
    Python `OrtValue` (61 for SmolLM2's full step: 79 us a call, ~1% of an int4 token) to read the first; the list
    it wraps (`IOBinding._iobinding.get_outputs()`, 0.3 us) is read instead where this ONNX Runtime has it."""
    raw = getattr(binding, "_iobinding", None)
    return raw.get_outputs() if raw is not None and hasattr(raw, "get_outputs") else binding.get_outputs()


class _Bound:
    """One graph's I/O binding on the buffers of one capacity. After a run, ONNX Runtime code and data are out of the
    caches and every binding call costs ~20-40 us (measured on SmolLM2's int4 step, against 2-5 us in a loop), so a
    decode step binds only the mask: the other inputs are copied into arrays bound once per shape, and the outputs
    other than the cache (logits, hidden states) are written by ONNX Runtime into arrays bound once their shapes are
    known (the first run with the same input shapes gives them; a run whose output would have another shape is
    refused by ONNX Runtime, not written), then copied out: the graph's next run writes there again."""

    def __init__(self, session, capacity: int):
        self.binding, self.capacity = session.io_binding(), capacity
        self.inputs: dict[str, np.ndarray] = {}  # name -> the array bound
        self.outputs: dict[str, np.ndarray] = {}  # name -> the array bound
        self.output_shapes: dict[tuple, list] = {}  # input shapes -> [(shape, dtype)] per output

    def feed(self, name: str, array: np.ndarray) -> None:
        held = self.inputs.get(name)
        if held is not None and held.shape == array.shape and held.dtype == array.dtype:
            held[...] = array
            return
        held = self.inputs[name] = np.array(array, order="C")
        self.binding.bind_input(name, "cpu", 0, held.dtype.type, held.shape, held.ctypes.data)

    def run(self, session, outputs: Sequence[str], input_shapes: tuple) -> list[np.ndarray]:
        b, known = self.binding, self.output_shapes.get(input_shapes)
        if known is None:  # unallocated: ONNX Runtime allocates them (reusing them on its next run: copied)
            for name in outputs:
                b.bind_output(name, "cpu")
                self.outputs.pop(name, None)
            session.run_with_iobinding(b)
            values = _bound_outputs(b)
            results = [np.array(values[i].numpy()) for i in range(len(outputs))]
            self.output_shapes[input_shapes] = [(r.shape, r.dtype) for r in results]
            return results
        for name, (shape, dtype) in zip(outputs, known):
            held = self.outputs.get(name)
            if held is None or held.shape != shape or held.dtype != dtype:
                held = self.outputs[name] = np.empty(shape, dtype)
                b.bind_output(name, "cpu", 0, held.dtype.type, held.shape, held.ctypes.data)
        session.run_with_iobinding(b)
        return [self.outputs[name].copy() for name in outputs]


class InPlaceKV:
    """Per layer a key and a value buffer `(batch, kv_heads, capacity, head_dim)` owned by one cache, and an
    I/O binding per graph reading and writing them."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, dtype, max_positions: int):
        self.layers = layers
        self.shape = (batch, kv_heads, head_dim)
        self.dtype, self.max_positions = np.dtype(dtype), max_positions
        self.capacity = 0
        self.memory = None  # (2, layers, batch, kv_heads, capacity, head_dim): keys and values, one allocation
        self.buffers: tuple[list, list] = ([], [])  # keys, values: per layer a view of `memory`
        self.views: tuple[list, list] = ([None] * layers, [None] * layers)  # what the cache held after our last call
        self.bound: dict[str, _Bound] = {}

    def run(self, graph: str, session, layers: range, cache, feeds: dict, outputs: Sequence[str],
            names: Callable = suffixed) -> list[np.ndarray]:
        """One call of `graph` (running `layers`, consecutive) on `cache`, whose mask already holds this call's
        positions: `outputs` (arrays of their own), while the cache's arrays of `layers` become views of the
        buffers, `total` positions long."""
        total = cache.length
        if total > self.capacity:
            self._grow(total)
        self._take(cache, layers)
        bound = self.bound.get(graph)
        if bound is None or bound.capacity != self.capacity:
            bound = self.bound[graph] = self._bind(session, layers, outputs, names)
        for name, array in feeds.items():
            bound.feed(name, array)
        bound.binding.bind_cpu_input("attention_mask", cache.attention_mask)  # a new shape each step
        results = bound.run(session, outputs, tuple(array.shape for array in feeds.values()))
        span = slice(layers.start, layers.stop)
        for kind, arrays in enumerate((cache.keys, cache.values)):  # one view per layer, made by numpy's iteration
            arrays[span] = self.views[kind][span] = list(self.memory[kind, span, :, :, :total])
        return results

    def append(self, cache, layer: int, keys: np.ndarray, values: np.ndarray) -> bool:
        """Write `keys` / `values` (a kv fill's) after the layer's cache in its buffers (the cache copied in first
        if it changed elsewhere); False where they do not fit (the caller concatenates)."""
        total = cache.keys[layer].shape[2] + keys.shape[2]
        if total > self.capacity or keys.shape[0] != self.shape[0]:
            return False
        self._take(cache, range(layer, layer + 1))
        for kind, (arrays, new) in enumerate(((cache.keys, keys), (cache.values, values))):
            buffer = self.buffers[kind][layer]
            buffer[:, :, arrays[layer].shape[2]:total] = new
            arrays[layer] = self.views[kind][layer] = buffer[:, :, :total]
        return True

    def _take(self, cache, layers: range) -> None:
        """Copy into the buffers every layer of `layers` the cache changed since our last call (or never gave us);
        a rollback's truncated view of a buffer is already in it."""
        span = slice(layers.start, layers.stop)
        for kind, arrays in enumerate((cache.keys, cache.values)):
            if all(map(operator.is_, arrays[span], self.views[kind][span])):  # the decode step's case, checked in C
                continue
            for layer in layers:
                array, buffer = arrays[layer], self.buffers[kind][layer]
                if array is not self.views[kind][layer] and not _prefix_of(array, buffer):
                    buffer[:, :, :array.shape[2]] = array

    def _grow(self, total: int) -> None:
        if total > self.max_positions:
            raise InputError(f"context of {total} positions exceeds the model's {self.max_positions}")
        capacity = min(self.max_positions, max(2 * self.capacity, total, START_CAPACITY))
        batch, heads, dim = self.shape
        # keys and values of every layer in one allocation: a call's views of its layers are one slice of it
        self.memory = np.zeros((2, self.layers, batch, heads, capacity, dim), dtype=self.dtype)
        self.buffers = (list(self.memory[0]), list(self.memory[1]))
        self.views = ([None] * self.layers, [None] * self.layers)  # `_take` copies each layer in when it next runs
        self.capacity = capacity  # every graph's binding is redone on its next call

    def _bind(self, session, layers: range, outputs: Sequence[str], names: Callable) -> _Bound:
        bound = _Bound(session, self.capacity)
        b = bound.binding
        for name in outputs:  # first: `run` reads them by position
            b.bind_output(name, "cpu")
        batch, heads, dim = self.shape
        shape, kind_type = [batch, heads, self.capacity, dim], self.dtype.type
        for layer in layers:
            past_key, past_value, present_key, present_value = names(layer)
            for past, present, buffer in ((past_key, present_key, self.buffers[0][layer]),
                                          (past_value, present_value, self.buffers[1][layer])):
                ptr = buffer.ctypes.data
                b.bind_input(past, "cpu", 0, kind_type, shape, ptr)
                b.bind_output(present, "cpu", 0, kind_type, shape, ptr)
        return bound
