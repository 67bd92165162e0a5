"""The TensorRT backend: the bundle's engines chained on the GPU, with the same public API as
the ONNX Runtime `Model` (load / start / step / last_logits / exit_features / generate / stream).

Uses the `tensorrt` Python API and cuda-python (device memory, streams, CUDA graphs); never
torch or pycuda. Importing this module needs neither: they are imported when a model is made,
and their absence, or the absence of a CUDA device, is one `GpuUnavailableError` line.

What stays on the device: hidden states between blocks (two ping-pong buffers), the KV cache
between steps (per layer two buffers: a cache of length L lives in buffer L % 2, and a decode
step reads one and writes the other, since each block returns past + new as `present`), the
last-position rows fed to the heads (one cudaMemcpy2DAsync), and the exit head: only top-1 id,
probability and gap come back (`probe_layers`), and the final logits when a step asks for them.

Each engine gets one execution context per optimization profile (0 = prefill, 1 = decode, heads
one), each pinned to its profile with `set_optimization_profile_async`; a call sets input shapes
(`set_input_shape`), tensor addresses (`set_tensor_address`) and enqueues (`execute_async_v3`).
Decode steps have fixed shapes for a given (batch, past length), so they are captured in CUDA
graphs: the second time a (graph, shapes, addresses) key is seen its ordinary enqueue is
followed by a capture (TensorRT wants an enqueue after a shape change before capturing), and
later occurrences replay the graph (`cudaGraphLaunch`). `cuda_graphs=False` turns this off.

Early exit (`run_layers(..., decider)`, `early_exit.predict`, `mode="early-exit"`): after each
evaluated block the exit decider engine (`exit_decider`, built by `build-engines` from the
calibration's folded exit head, with cos_prev / norm_ratio / layer_frac computed inside it:
engines/decider.py) runs on the last position's hidden state and the previous block's, both
still on the device (the two ping-pong buffers; `layer_frac` comes from a device table). Only
`score` (4 bytes) and `top1_id` (8 bytes) per batch row come back, and the stream synchronizes
once per evaluated layer; the threshold is compared on the host (runtime/device_exit.py).
Policies scored by classifier.onnx (ONNX-ML ops) are refused in one line. After an exit, the
skipped layers' keys and values come from the `kv_fill_NN` engines, written into the cache on
the device, so generation can go on (`fill_skipped`).

One generation at a time per model: the staging buffers are the model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..engines.errors import EngineError
from ..engines.metadata import DECIDER
from ..errors import InputError
from . import cuda_rt
from .bundle import Bundle, open_bundle
from .device_exit import DeviceDecider, device_decider, run_blocks
from .model import DecodeState, LayerRun, Model
from .tokenizer import TextTokenizer

MAX_GRAPHS = 4096


@dataclass
class DeviceDecodeState(DecodeState):
    """A DecodeState whose keys and values live on the device (`cache`); `keys`/`values` stay empty."""

    cache: Optional["_KVCache"] = None


class _KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, itemsize: int):
        self.row = kv_heads * head_dim * itemsize  # bytes per position per batch row
        nbytes = batch * capacity * self.row
        self.keys = [[cuda_rt.DeviceBuffer(nbytes), cuda_rt.DeviceBuffer(nbytes)] for _ in range(layers)]
        self.values = [[cuda_rt.DeviceBuffer(nbytes), cuda_rt.DeviceBuffer(nbytes)] for _ in range(layers)]
        self.empty = cuda_rt.DeviceBuffer(16)  # the zero-length past of a prefill
        self.lengths = [0] * layers
        self.capacity = capacity

    def past(self, layer: int, length: int) -> tuple[int, int]:
        if length == 0:
            return self.empty.ptr, self.empty.ptr
        return self.keys[layer][length % 2].ptr, self.values[layer][length % 2].ptr

    def present(self, layer: int, length: int) -> tuple[int, int]:
        return self.keys[layer][length % 2].ptr, self.values[layer][length % 2].ptr

    def free(self) -> None:
        for pair in self.keys + self.values:
            for buf in pair:
                buf.free()
        self.empty.free()

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


class _Engine:
    """One deserialized engine, one execution context per optimization profile."""

    def __init__(self, trt, runtime, path: Path, stream):
        self.name = path.stem
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not load {path.name}; rebuild with `adainfer build-engines`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.contexts = []
        for index in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, cuda_rt.stream_handle(stream))
            self.contexts.append(context)
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, object] = {}

    def run(self, profile: int, shapes: dict, addresses: dict, stream, graphs: bool) -> None:
        context = self.contexts[profile]
        key = (profile, tuple(sorted((k, tuple(v)) for k, v in shapes.items())), tuple(sorted(addresses.items())))
        exec_ = self.graphs.get(key) if graphs else None
        if exec_ is not None:
            cuda_rt.check(cuda_rt.cudart().cudaGraphLaunch(exec_, stream))
            return
        for name in self.inputs:
            context.set_input_shape(name, tuple(shapes[name]))
        for name, ptr in addresses.items():
            context.set_tensor_address(name, ptr)
        if not context.execute_async_v3(cuda_rt.stream_handle(stream)):
            raise RuntimeError(f"TensorRT failed to run {self.name}")
        if graphs and len(self.graphs) < MAX_GRAPHS:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] >= 2:
                self.graphs[key] = self._capture(context, stream)

    def _capture(self, context, stream):
        rt = cuda_rt.cudart()
        cuda_rt.check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        ok = context.execute_async_v3(cuda_rt.stream_handle(stream))
        graph = cuda_rt.check(rt.cudaStreamEndCapture(stream))
        if not ok:
            raise RuntimeError(f"TensorRT failed to capture {self.name}")
        exec_ = cuda_rt.check(rt.cudaGraphInstantiate(graph, 0))
        cuda_rt.check(rt.cudaGraphDestroy(graph))
        return exec_


class DeviceHidden:
    """Hidden states (batch, seq, hidden) that `run_layers` left on the device; valid until the
    model's next call. `[:, -1, :]` gives `DeviceRows` (read on the device by `final_logits` and
    `fill_skipped`); any other use copies them to the host."""

    def __init__(self, model: "TensorRTModel", buffer, batch: int, seq: int):
        self.model, self.buffer = model, buffer
        self.shape = (batch, seq, model.manifest.hidden_size)
        self.dtype = np.dtype(np.float32)

    def numpy(self) -> np.ndarray:
        out = self.buffer.download(np.empty(self.shape, dtype=np.float32), self.model.stream)
        cuda_rt.synchronize(self.model.stream)
        return out

    def __array__(self, dtype=None, copy=None):
        return self.numpy() if dtype is None else self.numpy().astype(dtype)

    def __getitem__(self, key):
        if key == (slice(None), -1, slice(None)):
            return DeviceRows(self)
        return self.numpy()[key]


class DeviceRows:
    """The last position's rows (batch, hidden) of a `DeviceHidden`."""

    def __init__(self, hidden: DeviceHidden):
        self.hidden = hidden
        self.shape = (hidden.shape[0], hidden.shape[2])
        self.dtype = np.dtype(np.float32)

    def ptr(self) -> int:
        batch, seq, _ = self.hidden.shape
        return self.hidden.model._last_rows(self.hidden.buffer, batch, seq)

    def numpy(self) -> np.ndarray:
        model = self.hidden.model
        out = np.empty(self.shape, dtype=np.float32)
        cuda_rt.check(cuda_rt.cudart().cudaMemcpyAsync(out.ctypes.data, self.ptr(), out.nbytes,
                                                       cuda_rt.cudart().cudaMemcpyKind.cudaMemcpyDeviceToHost, model.stream))
        cuda_rt.synchronize(model.stream)
        return out

    def __array__(self, dtype=None, copy=None):
        return self.numpy() if dtype is None else self.numpy().astype(dtype)


@dataclass
class _Pass:
    """One pass through the blocks: its shapes, profile and positions."""

    batch: int
    seq: int
    past: int
    total: int
    profile: int
    graphs: bool
    position_ids: np.ndarray


class TensorRTModel(Model):
    """A bundle on TensorRT engines built on this device by `adainfer build-engines`."""

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, cuda_graphs: bool = True):
        from ..engines.metadata import find_engines

        trt = cuda_rt.import_tensorrt()
        cuda_rt.require_gpu()
        directory, record = find_engines(bundle.root, cuda_rt.device_info())
        self.bundle = bundle
        self.manifest = m = bundle.manifest
        tok = bundle.tokenizer_path
        self.tokenizer = TextTokenizer(tok) if tok is not None else None
        self.num_layers = m.num_layers
        self.session_calls = {name: 0 for name in m.graphs}
        self.cuda_graphs = cuda_graphs
        self.options = record["options"]
        self.max_batch, self.max_seq = self.options["max_batch"], self.options["max_seq"]
        self.max_context = self.options["max_context"]
        self.stream = cuda_rt.new_stream()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.record, self.engines_dir = record, directory
        self._decider, self._pass = None, None
        self.engines = {}
        for graph in [*m.graphs, *([DECIDER] if DECIDER in record["graphs"] else [])]:
            if graph not in record["graphs"]:
                raise EngineError(f"the engine record has no {graph}; rebuild with `adainfer build-engines {bundle.root}`")
            path = directory / record["graphs"][graph]["file"]
            if not path.is_file():
                raise EngineError(f"missing engine {path}; rebuild with `adainfer build-engines {bundle.root}`")
            self.engines[graph] = _Engine(trt, self._runtime, path, self.stream)
        h, b, s = m.hidden_size, self.max_batch, self.max_seq
        self._hidden = [cuda_rt.DeviceBuffer(b * s * h * 4), cuda_rt.DeviceBuffer(b * s * h * 4)]
        self._rows = cuda_rt.DeviceBuffer(b * h * 4)
        self._rows_prev = cuda_rt.DeviceBuffer(b * h * 4)
        kv_row = m.num_kv_heads * m.head_dim * 4
        self._fill = [cuda_rt.DeviceBuffer(b * s * kv_row), cuda_rt.DeviceBuffer(b * s * kv_row)]  # kv_fill outputs
        self._ids = cuda_rt.DeviceBuffer(b * s * 8)
        self._positions = cuda_rt.DeviceBuffer(b * s * 8)
        self._mask = cuda_rt.DeviceBuffer(b * self.max_context * 8)
        self._logits = cuda_rt.DeviceBuffer(b * m.vocab_size * 4)
        self._exit = {o: cuda_rt.DeviceBuffer(b * 8) for o in self.engines["exit_head"].outputs}
        self._decider_out, self._fractions = {}, None
        if DECIDER in self.engines:
            from ..engines.decider import layer_fractions

            self._decider_out = {o: cuda_rt.DeviceBuffer(b * 8) for o in self.engines[DECIDER].outputs}
            self._fractions = cuda_rt.DeviceBuffer(m.num_layers * b * 4)  # layer_frac of every layer, uploaded once
            self._fractions.upload(layer_fractions(m.num_layers, b), self.stream)
            cuda_rt.synchronize(self.stream)
        self.last_exit_features: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ state

    def new_state(self, batch: int) -> DeviceDecodeState:
        m = self.manifest
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds the engines' max batch {self.max_batch} (rebuild with --max-batch)")
        itemsize = self.engines[m.block_name(0)].dtypes["present_key"].itemsize
        cache = _KVCache(m.num_layers, batch, m.num_kv_heads, m.head_dim, self.max_context, itemsize)
        return DeviceDecodeState(keys=[], values=[], attention_mask=np.zeros((batch, 0), dtype=np.int64),
                                 next_position=np.zeros(batch, dtype=np.int64), cache=cache)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: np.ndarray, state: DeviceDecodeState, step_mask: np.ndarray,
                depth: Optional[int] = None, probe_layers: Sequence[int] = ()) -> np.ndarray:
        """Embed, run the first `depth` blocks (all by default), then the final head on the last
        positions; returns its logits (batch, vocab). `probe_layers` (1-based) also run the exit
        head on the device after those blocks: `last_exit_features[layer] = (top1, prob, gap)`."""
        logits_dev = self.forward_device(input_ids, state, step_mask, depth, probe_layers)
        out = np.empty((input_ids.shape[0], self.manifest.vocab_size), dtype=np.float32)
        logits_dev.download(out, self.stream)
        cuda_rt.synchronize(self.stream)
        for layer, arrays in self.last_exit_features.items():
            self.last_exit_features[layer] = tuple(a.copy() for a in arrays)
        return out

    def forward_device(self, input_ids, state: DeviceDecodeState, step_mask, depth=None, probe_layers=()):
        m = self.manifest
        depth = m.num_layers if depth is None else depth
        p = self._begin(input_ids, state, step_mask, depth)
        self.last_exit_features = {}
        for layer in range(depth):
            self._block(p, layer, state)
            if layer + 1 in probe_layers:
                rows = self._last_rows(self._hidden[(layer + 1) % 2], p.batch, p.seq)
                self.last_exit_features[layer + 1] = self._exit_head(rows, p.batch, p.graphs)
        rows = self._last_rows(self._hidden[depth % 2], p.batch, p.seq)
        self._call("final_head", 0, {"hidden_states": (p.batch, m.hidden_size)},
                   {"hidden_states": rows, "logits": self._logits.ptr}, p.graphs)
        return self._logits

    def _begin(self, input_ids, state: DeviceDecodeState, step_mask, depth: int) -> _Pass:
        """Check the step against the engines and the cache, extend the mask, embed into hidden buffer 0."""
        m = self.manifest
        if not 1 <= depth <= m.num_layers:
            raise InputError(f"depth must be in 1..{m.num_layers}, got {depth}")
        batch, seq = input_ids.shape
        past = state.length
        if seq > self.max_seq or past + seq > self.max_context:
            raise InputError(f"{past + seq} positions exceed the engines' limits (prompt {self.max_seq}, context "
                             f"{self.max_context}); rebuild with larger --max-seq / --max-context")
        if past and seq % 2 == 0:
            raise InputError("the tensorrt backend feeds a filled cache one token at a time")
        stale = [l + 1 for l in range(depth) if state.cache.lengths[l] != past]
        if stale:
            raise InputError(f"layer {stale[0]}'s cache is behind after an early exit; it cannot be continued at depth {depth}")
        position_ids = state.advance(step_mask)
        profile = 0 if past == 0 else 1
        p = _Pass(batch, seq, past, state.length, profile, self.cuda_graphs and profile == 1, position_ids)

        embed = self.engines["embed"]
        self._upload(self._ids, input_ids, embed.dtypes["input_ids"])
        self._upload(self._positions, position_ids, self.engines[m.block_name(0)].dtypes["position_ids"])
        self._upload(self._mask, state.attention_mask, self.engines[m.block_name(0)].dtypes["attention_mask"])
        feeds = {"input_ids": self._ids.ptr, "position_ids": self._positions.ptr, "hidden_states": self._hidden[0].ptr}
        shapes = {"input_ids": (batch, seq), "position_ids": (batch, seq)}
        self._call("embed", profile, {k: shapes[k] for k in embed.inputs},
                   {k: feeds[k] for k in embed.inputs + embed.outputs}, p.graphs)
        return p

    def _block(self, p: _Pass, layer: int, state: DeviceDecodeState) -> None:
        """Block `layer` (0-based): hidden buffer layer % 2 -> (layer + 1) % 2, cache past -> total."""
        m = self.manifest
        kv = (p.batch, m.num_kv_heads)
        past_k, past_v = state.cache.past(layer, p.past)
        present_k, present_v = state.cache.present(layer, p.total)
        self._call(m.block_name(layer), p.profile,
                   {"hidden_states": (p.batch, p.seq, m.hidden_size), "position_ids": (p.batch, p.seq),
                    "attention_mask": (p.batch, p.total), "past_key": (*kv, p.past, m.head_dim),
                    "past_value": (*kv, p.past, m.head_dim)},
                   {"hidden_states": self._hidden[layer % 2].ptr, "position_ids": self._positions.ptr,
                    "attention_mask": self._mask.ptr, "past_key": past_k, "past_value": past_v,
                    "hidden_states_out": self._hidden[(layer + 1) % 2].ptr, "present_key": present_k,
                    "present_value": present_v}, p.graphs)
        state.cache.lengths[layer] = p.total

    # ------------------------------------------------------------------ early exit on the device

    def run_layers(self, input_ids: np.ndarray, state: DeviceDecodeState, step_mask: np.ndarray, decider=None) -> LayerRun:
        """Embed and run the blocks on the device; with a `decider` (an ExitDecider, ExitPolicy or
        DeviceDecider) stop where the on-device exit decision says. `hidden` is a `DeviceHidden`."""
        decider = self._device_decider(decider)
        p = self._begin(input_ids, state, step_mask, self.num_layers)
        self._pass = p
        exit_layer, decisions, decision = run_blocks(self.num_layers, lambda layer: self._block(p, layer - 1, state),
                                                     lambda layer, d: self._decide(p, layer, d), decider)
        state.complete_layers = exit_layer if exit_layer < self.num_layers else None
        return LayerRun(DeviceHidden(self, self._hidden[exit_layer % 2], p.batch, p.seq), p.position_ids, exit_layer,
                        decisions, decision.token if decision is not None else None)

    def decider(self) -> Optional[DeviceDecider]:
        """The bundle's calibrated exit policy as an on-device decider (None if never calibrated)."""
        if self._decider is None:
            from .early_exit import load_policy

            policy = load_policy(self)
            self._decider = self._device_decider(policy) if policy is not None else None
        return self._decider

    def _device_decider(self, decider) -> Optional[DeviceDecider]:
        decider = device_decider(decider, self.num_layers, "tensorrt")
        if decider is not None and decider.graph == DECIDER:
            from ..engines.decider import extra_features
            from ..engines.metadata import check_decider
            from ..manifest import sha256_of

            head_file = decider.policy.head_file
            listed = next((a.sha256 for a in self.manifest.attachments.values() if a.file == head_file), None)
            sha = listed or (sha256_of(self.bundle.root / head_file) if (self.bundle.root / head_file).is_file() else None)
            check_decider(self.record, sha, extra_features(decider.policy), self.bundle.root)
        return decider

    def _decide(self, p: _Pass, layer: int, decider: DeviceDecider) -> dict:
        """Run the decision graph after block `layer` (1-based) on the device; copy back its few outputs."""
        from ..engines.decider import HIDDEN, LAYER_FRAC, PREVIOUS

        m, batch = self.manifest, p.batch
        current, previous = self._hidden[layer % 2], self._hidden[(layer - 1) % 2]
        if decider.graph == "exit_head":
            top1, prob, gap = self._exit_head(self._last_rows(current, batch, p.seq), batch, p.graphs)
            cuda_rt.synchronize(self.stream)
            return {"top1_id": top1, "top1_prob": prob, "gap": gap}
        engine = self.engines[DECIDER]
        shapes = {HIDDEN: (batch, m.hidden_size), PREVIOUS: (batch, m.hidden_size), LAYER_FRAC: (batch, 1)}
        addresses = {}
        if HIDDEN in engine.inputs:
            addresses[HIDDEN] = self._last_rows(current, batch, p.seq)
        if PREVIOUS in engine.inputs:
            addresses[PREVIOUS] = self._last_rows(previous, batch, p.seq, into=self._rows_prev)
        if LAYER_FRAC in engine.inputs:
            addresses[LAYER_FRAC] = self._fractions.ptr + (layer - 1) * self.max_batch * 4
        addresses.update({o: self._decider_out[o].ptr for o in engine.outputs})
        self._call(DECIDER, 0, {k: shapes[k] for k in engine.inputs}, addresses, p.graphs)
        out = {name: self._decider_out[name].download(np.empty(batch, dtype=engine.dtypes[name]), self.stream)
               for name in decider.outputs}  # score: 4 bytes, top1_id: 8 bytes per row
        cuda_rt.synchronize(self.stream)
        return out

    def fill_skipped(self, state: DeviceDecodeState, run: LayerRun) -> None:
        """Give layers exit+1 .. L this step's keys and values from the exit hidden state (the
        `kv_fill_NN` engines), appended to their caches on the device (CALM's propagation)."""
        m, p = self.manifest, self._pass
        if not self.has_kv_fill:
            from ..errors import BundleError

            raise BundleError("this bundle has no kv_fill graphs (re-export it to generate with early exit)")
        if not isinstance(run.hidden, DeviceHidden) or run.hidden.shape[:2] != (p.batch, p.seq):
            raise InputError("fill_skipped takes the run_layers result of this model's last step")
        row = m.head_dim * 4
        rows = p.batch * m.num_kv_heads
        rt = cuda_rt.cudart()
        d2d = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for layer in range(run.exit_layer, m.num_layers):  # 0-based: the skipped blocks
            name = f"kv_fill_{layer:02d}"
            self._call(name, p.profile, {"hidden_states": (p.batch, p.seq, m.hidden_size), "position_ids": (p.batch, p.seq)},
                       {"hidden_states": run.hidden.buffer.ptr, "position_ids": self._positions.ptr,
                        "key": self._fill[0].ptr, "value": self._fill[1].ptr}, p.graphs)
            past_k, past_v = state.cache.past(layer, p.past)
            present_k, present_v = state.cache.present(layer, p.total)
            for src, new, dst in ((past_k, self._fill[0].ptr, present_k), (past_v, self._fill[1].ptr, present_v)):
                if p.past:  # (batch, kv, past, hd) -> the first past positions of (batch, kv, total, hd)
                    cuda_rt.check(rt.cudaMemcpy2DAsync(dst, p.total * row, src, p.past * row, p.past * row, rows, d2d, self.stream))
                cuda_rt.check(rt.cudaMemcpy2DAsync(dst + p.past * row, p.total * row, new, p.seq * row, p.seq * row, rows,
                                                   d2d, self.stream))
            state.cache.lengths[layer] = p.total
        state.complete_layers = None

    @property
    def has_kv_fill(self) -> bool:
        return self.num_layers == 0 or "kv_fill_00" in self.engines

    def _last_rows(self, hidden, batch: int, seq: int, into=None) -> int:
        """Device address of (batch, hidden) last-position rows: the buffer itself for one token,
        else a copy into `into` (default: the rows buffer)."""
        if seq == 1:
            return hidden.ptr
        into = self._rows if into is None else into
        row = self.manifest.hidden_size * 4
        cuda_rt.copy_rows(into.ptr, hidden.ptr + (seq - 1) * row, batch, row, seq * row, self.stream)
        return into.ptr

    def _exit_head(self, rows_ptr: int, batch: int, graphs: bool):
        head = self.engines["exit_head"]
        self._call("exit_head", 0, {"hidden_states": (batch, self.manifest.hidden_size)},
                   {"hidden_states": rows_ptr, **{o: self._exit[o].ptr for o in head.outputs}}, graphs)
        host = []
        for name in ("top1_id", "top1_prob", "gap"):
            out = np.empty(batch, dtype=head.dtypes[name])
            host.append(self._exit[name].download(out, self.stream))
        return tuple(host)  # valid after the stream synchronizes (forward does)

    def _call(self, graph: str, profile: int, shapes: dict, addresses: dict, graphs: bool) -> None:
        self.session_calls[graph] += 1
        self.engines[graph].run(profile, shapes, addresses, self.stream, graphs)

    def _upload(self, buffer, array: np.ndarray, dtype) -> None:
        buffer.upload(np.ascontiguousarray(array, dtype=dtype), self.stream)

    # ------------------------------------------------------------------ heads from host arrays

    def final_logits(self, hidden_last) -> np.ndarray:
        """Logits of (rows, hidden) hidden states: host arrays, or `run.hidden[:, -1, :]` of a
        `run_layers` result, which stays on the device."""
        if isinstance(hidden_last, DeviceRows):
            shape, ptr = hidden_last.shape, hidden_last.ptr()
        else:
            rows = np.ascontiguousarray(hidden_last, dtype=np.float32)
            self._check_rows(rows)
            self._rows.upload(rows, self.stream)
            shape, ptr = rows.shape, self._rows.ptr
        self._call("final_head", 0, {"hidden_states": shape}, {"hidden_states": ptr, "logits": self._logits.ptr}, False)
        out = self._logits.download(np.empty((shape[0], self.manifest.vocab_size), dtype=np.float32), self.stream)
        cuda_rt.synchronize(self.stream)
        return out

    def exit_features(self, hidden_last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = np.ascontiguousarray(hidden_last, dtype=np.float32)
        self._check_rows(rows)
        self._rows.upload(rows, self.stream)
        result = self._exit_head(self._rows.ptr, rows.shape[0], False)
        cuda_rt.synchronize(self.stream)
        return result

    def _check_rows(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.manifest.hidden_size or not 1 <= rows.shape[0] <= self.max_batch:
            raise InputError(f"expected (rows <= {self.max_batch}, {self.manifest.hidden_size}) hidden states, got {rows.shape}")

    def embed(self, *args, **kwargs):
        raise InputError("the tensorrt backend keeps hidden states on the device; use forward() or the onnxruntime backend")

    block = embed

    def stream(self, *args, **kwargs):
        if kwargs.get("mode", "full") == "speculative":
            raise InputError("the tensorrt backend generates in modes full and early-exit (speculative decoding rolls the "
                             "cache back, which its device cache does not do yet)")
        return super().stream(*args, **kwargs)

    def finish_layers(self, *args, **kwargs):
        raise InputError("the tensorrt backend does not re-run skipped blocks; after an early exit it fills their "
                         "cache with fill_skipped (kv_fill engines)")

    # ------------------------------------------------------------------ timing

    def time_decode(self, prompt_ids: Sequence[int], steps: int, depth: Optional[int] = None) -> float:
        """Seconds per decode step at `depth` blocks (all by default) then the final head, greedy,
        after a prefill at the same depth; the state is self-consistent at that depth."""
        state = self.new_state(1)
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        logits = self.forward(ids, state, np.ones_like(ids), depth=depth)
        token = int(logits[0].argmax())
        started = time.perf_counter()
        for _ in range(steps):
            one = np.asarray([[token]], dtype=np.int64)
            logits = self.forward(one, state, np.ones_like(one), depth=depth)
            token = int(logits[0].argmax())
        return (time.perf_counter() - started) / max(steps, 1)


def load_tensorrt(bundle_dir, check_digests: bool = True, cuda_graphs: bool = True) -> TensorRTModel:
    """Load a bundle on its TensorRT engines (built on this device by `adainfer build-engines`)."""
    cuda_rt.import_tensorrt()
    cuda_rt.require_gpu()
    return TensorRTModel(open_bundle(bundle_dir, check_digests=check_digests), cuda_graphs=cuda_graphs)
