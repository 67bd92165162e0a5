"""The `cpu` backend: one ONNX Runtime session per graph, the KV cache in numpy.

Each block call takes the cache as `past_*` arrays and returns `present_*`, which replace them
(the concatenation happens inside the graph). With spans, a graph whose caches GroupQueryAttention
writes (the full step, a span, a block of a fused bundle) appends them in place instead
(`kv_in_place.InPlaceKV`: buffers the cache owns, no copy of the cache per call); the cache's arrays
are then views of those buffers, so `fork` copies them, and `truncate` is a slice either way. Loaded
models serve several threads at once: every generation owns its cache.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Optional, Sequence

import numpy as np

from ...errors import BundleError
from ..backend import KVState, kv_dtype
from ..bundle import Bundle
from ..early_exit import HostDecisions
from ..kv_in_place import InPlaceKV, plain, suffixed, supports
from ..q4_1_kernel import library as q4_1_library, twin_file, twin_key
from ..sessions import DEFAULT_PROVIDERS, make_session


class HostKVCache(KVState):
    """Per-layer keys and values as numpy arrays `(batch, kv_heads, length, head_dim)` in the block graphs' dtype
    (after a call in place: the layers it ran are views of `in_place`'s buffers, which this cache owns)."""

    def __init__(self, keys: list, values: list, batch: int):
        self.keys, self.values = keys, values
        self.in_place: Optional[InPlaceKV] = None
        self._init_state(batch)

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, head_dim: int, dtype) -> "HostKVCache":
        empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
        return cls([empty] * layers, [empty] * layers, batch)

    def append(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        if keys.dtype != self.keys[layer].dtype:
            raise BundleError(f"kv_fill gave {keys.dtype} keys for a {self.keys[layer].dtype} cache (re-export the bundle)")
        if self.in_place is not None and self.in_place.append(self, layer, keys, values):
            return
        self.keys[layer] = np.concatenate([self.keys[layer], keys], axis=2)
        self.values[layer] = np.concatenate([self.values[layer], values], axis=2)

    def fork(self) -> "HostKVCache":
        own = self.in_place is not None  # views of our buffers, which our next full step overwrites: copies
        other = HostKVCache([np.array(k) if own else k for k in self.keys],
                            [np.array(v) if own else v for v in self.values], self.batch)
        self._copy_state_to(other)
        return other

    def truncate(self, length: int) -> None:
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]
        self._truncate_state(length)

    def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[index], self.values[index]

    def close(self) -> None:
        self.in_place = None


def used_spans(manifest, enabled: bool = True) -> tuple:
    """The (first, last) spans a backend runs (`segments.cover` picks among them): the bundle's, unless disabled."""
    return tuple(sorted(manifest.spans)) if enabled else ()


class Sessions(Mapping):
    """One ONNX Runtime session per graph, by graph name; the graphs only early exit needs (the exit
    head, the kv_fill graphs) get theirs on first use, so a full-depth generation never holds them
    (the exit head is a whole LM head: 113 MB of weights, prepacked, on SmolLM2). With spans, the
    blocks a span covers and the spans other than the full-depth one are made on first use too: a
    full-depth pass runs the full-depth span only, so the blocks' weights are never held twice. With the
    full step (embedding, blocks and final head as one graph), that is the only graph made at load: the
    embedding, the heads and the full-depth span follow on first use (early exit, all-position logits).
    Every graph's interface is checked against the manifest at load all the same, by a session that
    skips graph optimization and weight prepacking (weights in external data are mapped, not read), except
    the merged kv fills', checked when first made."""

    LAZY = ("exit_head", "kv_fill_")

    def __init__(self, bundle: Bundle, providers, threads: Optional[int], require: Optional[str] = None,
                 spans: tuple = (), spinning: bool = True, full_step: Optional[str] = None):
        """`providers`: a list for every graph, or a function of the graph's name; `require`: the
        execution provider every session must really run on (`sessions.check_providers`); `spans`:
        the spans the backend runs (others are never loaded, their blocks are loaded on first use);
        `full_step`: the full step's graph name where the backend runs it; `spinning`: whether the sessions'
        threads spin-wait during their runs, the full step's between runs too (`sessions.session_options`)."""
        self.bundle, self.providers, self.threads, self.require = bundle, providers, threads, require
        self.spinning, self.full_step = spinning, full_step
        m = bundle.manifest
        covered = {m.block_name(i) for first, last in spans for i in range(first, last + 1)}
        full = m.spans.get((0, m.num_layers - 1)) if (0, m.num_layers - 1) in spans else None
        lazy_names = covered | {name for name in m.spans.values() if name != full}
        unused = {m.spans[r] for r in m.spans if r not in spans}  # never run here: interface read on the CPU
        if full_step is not None:  # a full-depth step runs it alone: everything else waits for first use
            lazy_names |= {"embed", "final_head", *m.spans.values()}
        elif m.full_step is not None:
            unused.add(m.full_step)
        self._sessions: dict = {}
        self._lock = threading.Lock()
        self.fused: set = set()  # graphs whose fused Q4_1 twin runs (q4_1_kernel.py)
        names = list(bundle.manifest.graphs)
        self.inputs = dict.fromkeys(names)  # manifest order for iteration; filled below
        self.outputs = dict.fromkeys(names)
        # the heads and the embedding first: loading a graph holds its raw weights and their prepacked
        # copy for a moment, so the vocabulary-sized ones go while little else is resident (peak RSS)
        # merged kv fills (one per layer a calibrated policy may exit at: dozens) are checked and made on first use,
        # not at load: they are small, only generation that exits runs them, and checking each at load cost ~75 ms
        self._deferred = set(m.fill_spans.values())
        for name in sorted(names, key=lambda n: n not in ("final_head", "exit_head", "embed")):
            if name in self._deferred:
                continue
            lazy = name.startswith(self.LAZY) or name in lazy_names
            if name in unused:
                session = make_session(bundle.graph_path(name), light=True)
            elif lazy:
                session = make_session(bundle.graph_path(name), self._providers(name), threads, light=True,
                                       require=require)
            else:
                session = self._make(name)
            bundle.check_session(name, session)  # the graphs' real interfaces match the manifest
            self.inputs[name] = [i.name for i in session.get_inputs()]
            self.outputs[name] = [o.name for o in session.get_outputs()]
            if not lazy:
                self._sessions[name] = session
            del session

    def __getitem__(self, name: str):
        session = self._sessions.get(name)
        if session is None:
            if name not in self.inputs:
                raise KeyError(name)
            with self._lock:
                session = self._sessions.get(name)
                if session is None:
                    session = self._make(name)
                    if name in self._deferred:
                        self.bundle.check_session(name, session)
                        self.inputs[name] = [i.name for i in session.get_inputs()]
                        self.outputs[name] = [o.name for o in session.get_outputs()]
                    self._sessions[name] = session
        return session

    def _make(self, name: str):
        """The session that runs graph `name`: its fused Q4_1 twin where this machine runs the kernel."""
        path, custom_ops = self.bundle.graph_path(name), None
        twin = self.bundle.manifest.attachments.get(twin_key(name))
        providers = self._providers(name)
        if twin is not None and twin.file == twin_file(name, self.bundle.manifest.graphs[name].sha256) \
                and all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in providers):
            custom_ops = q4_1_library()
            if custom_ops is not None:
                path = self.bundle.root / twin.file
                self.fused.add(name)
        return make_session(path, providers, self.threads, require=self.require, spinning=self.spinning,
                            keep_spinning=name == self.full_step, custom_ops=custom_ops)

    def _providers(self, name: str):
        return self.providers(name) if callable(self.providers) else self.providers

    def __iter__(self):
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def __contains__(self, name) -> bool:
        return name in self.inputs

    def loaded(self) -> list[str]:
        """Names of the graphs whose full sessions exist now."""
        return list(self._sessions)

    def close(self) -> None:
        self._sessions.clear()


class CpuBackend(HostDecisions):
    name = "cpu"

    def __init__(self, bundle: Bundle, providers: Sequence = DEFAULT_PROVIDERS, threads: Optional[int] = None,
                 spans: bool = True, spinning: bool = True):
        """`spans`: run the bundle's span graphs and its full step where the chain can, and append the cache
        in place where a graph's GroupQueryAttention can (False: every block on its own, plainly);
        `spinning`: ONNX Runtime's spin-waiting threads (`sessions.session_options`)."""
        self.bundle, self.manifest = bundle, bundle.manifest
        self.num_layers = self.manifest.num_layers
        self.spans = used_spans(self.manifest, spans)
        self.span_graphs = self.manifest.spans  # (first, last) -> graph name, read once (not per token)
        self.fill_graphs = self.manifest.fill_spans if spans else {}  # (first, last) -> merged kv fill, read once
        self.full_step_graph = self.manifest.full_step if spans else None
        self.in_place = spans  # graphs append to the cache in place where their GroupQueryAttention can
        self._appends_in_place: dict[str, bool] = {}  # graph name -> whether it can (read on first use)
        self.sessions = Sessions(bundle, providers, threads, spans=self.spans, spinning=spinning,
                                 full_step=self.full_step_graph)
        self.calls: dict[str, int] = {name: 0 for name in self.manifest.graphs}
        self.kv_dtype = kv_dtype(self.manifest)

    @property
    def has_kv_fill(self) -> bool:
        return self.num_layers == 0 or "kv_fill_00" in self.sessions

    def _run(self, graph: str, **feeds: np.ndarray) -> list[np.ndarray]:
        self.calls[graph] += 1
        s = self.sessions
        return self.sessions[graph].run(s.outputs[graph], {n: feeds[n] for n in s.inputs[graph]})

    def new_cache(self, batch: int) -> HostKVCache:
        m = self.manifest
        return HostKVCache.empty(m.num_layers, batch, m.num_kv_heads, m.head_dim, self.kv_dtype)

    def embed(self, input_ids, position_ids, cache=None):
        (hidden,) = self._run("embed", input_ids=input_ids, position_ids=position_ids)
        return hidden

    def block(self, layer, hidden, position_ids, cache: HostKVCache):
        graph = self.manifest.block_name(layer)
        out = self._run_in_place(graph, range(layer, layer + 1), cache, plain, ["hidden_states_out"],
                                 hidden_states=hidden, position_ids=position_ids)
        if out is not None:
            return out[0]
        hidden, cache.keys[layer], cache.values[layer] = self._run(
            graph, hidden_states=hidden, position_ids=position_ids,
            attention_mask=cache.attention_mask, past_key=cache.keys[layer], past_value=cache.values[layer])
        return hidden

    def segment(self, first, last, hidden, position_ids, cache: HostKVCache):
        if first == last:
            return self.block(first, hidden, position_ids, cache)
        graph, layers = self.span_graphs[(first, last)], range(first, last + 1)
        out = self._run_in_place(graph, layers, cache, suffixed, ["hidden_states_out"],
                                 hidden_states=hidden, position_ids=position_ids)
        if out is not None:
            return out[0]
        return self._run_layers(graph, layers, cache, hidden_states=hidden, position_ids=position_ids)["hidden_states_out"]

    def _run_in_place(self, graph: str, layers: range, cache: HostKVCache, names, outputs: list, **feeds):
        """`graph`'s `outputs` with its layers' caches appended in place (`InPlaceKV`), or None where it cannot:
        in-place off, a graph whose caches GroupQueryAttention does not write, or several new tokens for a
        batch of several rows (GroupQueryAttention takes several new tokens on a cache for one row only)."""
        batch, seq = next(iter(feeds.values())).shape[:2]
        if not self.in_place or (batch > 1 and seq > 1):
            return None
        can = self._appends_in_place.get(graph)
        if can is None:
            can = self._appends_in_place[graph] = supports(self.bundle.graph_path(graph), layers, names)
        if not can:
            return None
        if cache.in_place is None:
            m = self.manifest
            cache.in_place = InPlaceKV(m.num_layers, batch, m.num_kv_heads, m.head_dim, self.kv_dtype, m.max_positions)
        self.calls[graph] += 1
        return cache.in_place.run(graph, self.sessions[graph], layers, cache, feeds, outputs, names)

    def _run_layers(self, graph: str, layers: range, cache: HostKVCache, **feeds) -> dict:
        """Run a graph of several blocks (a span, the full step) on the cache of `layers`: each layer's past in,
        its present back into the cache; the graph's outputs by name."""
        feeds["attention_mask"] = cache.attention_mask
        for layer in layers:
            feeds[f"past_key_{layer:02d}"], feeds[f"past_value_{layer:02d}"] = cache.keys[layer], cache.values[layer]
        out = dict(zip(self.sessions.outputs[graph], self._run(graph, **feeds)))
        for layer in layers:
            cache.keys[layer], cache.values[layer] = out[f"present_key_{layer:02d}"], out[f"present_value_{layer:02d}"]
        return out

    @property
    def runs_full_step(self) -> bool:
        return self.full_step_graph is not None

    def full_step(self, input_ids, position_ids, cache: HostKVCache) -> np.ndarray:
        """Embedding, every block and the final head in one graph call (`runs_full_step`): the last position's
        logits (batch, vocab); every layer's keys and values appended."""
        graph, layers = self.full_step_graph, range(self.num_layers)
        out = self._run_in_place(graph, layers, cache, suffixed, ["logits"], input_ids=input_ids, position_ids=position_ids)
        if out is not None:
            return out[0]
        return self._run_layers(graph, layers, cache, input_ids=input_ids, position_ids=position_ids)["logits"]

    def kv_fill_outputs(self, layer: int, hidden, position_ids) -> tuple[np.ndarray, np.ndarray]:
        key, value = self._run(f"kv_fill_{layer:02d}", hidden_states=hidden, position_ids=position_ids)
        return key, value

    def kv_fill(self, layer, hidden, position_ids, cache: HostKVCache) -> None:
        cache.append(layer, *self.kv_fill_outputs(layer, hidden, position_ids))

    def kv_fill_span(self, first, last, hidden, position_ids, cache: HostKVCache) -> bool:
        graph = self.fill_graphs.get((first, last))
        if graph is None:
            return False
        values = self._run(graph, hidden_states=hidden, position_ids=position_ids)  # (its session first: names known)
        out = dict(zip(self.sessions.outputs[graph], values))
        for layer in range(first, last + 1):
            cache.append(layer, out[f"key_{layer:02d}"], out[f"value_{layer:02d}"])
        return True

    def rows(self, hidden, which: str = "last"):
        return hidden[:, -1, :] if which == "last" else hidden.reshape(-1, hidden.shape[-1])

    def logits(self, rows) -> np.ndarray:
        (logits,) = self._run("final_head", hidden_states=np.ascontiguousarray(rows, dtype=np.float32))
        return logits

    def exit_outputs(self, rows):
        top1, prob, gap = self._run("exit_head", hidden_states=np.ascontiguousarray(rows, dtype=np.float32))
        return top1, prob, gap

    def host(self, tensor) -> np.ndarray:
        return np.asarray(tensor)

    def close(self) -> None:
        self.sessions.close()
