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

One generation at a time per model: the staging buffers are the model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..engines.errors import EngineError
from ..errors import InputError
from . import cuda_rt
from .bundle import Bundle, open_bundle
from .model import DecodeState, Model
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
        self.engines = {}
        for graph in m.graphs:
            path = directory / record["graphs"][graph]["file"]
            if not path.is_file():
                raise EngineError(f"missing engine {path}; rebuild with `adainfer build-engines {bundle.root}`")
            self.engines[graph] = _Engine(trt, self._runtime, path, self.stream)
        h, b, s = m.hidden_size, self.max_batch, self.max_seq
        self._hidden = [cuda_rt.DeviceBuffer(b * s * h * 4), cuda_rt.DeviceBuffer(b * s * h * 4)]
        self._rows = cuda_rt.DeviceBuffer(b * h * 4)
        self._ids = cuda_rt.DeviceBuffer(b * s * 8)
        self._positions = cuda_rt.DeviceBuffer(b * s * 8)
        self._mask = cuda_rt.DeviceBuffer(b * self.max_context * 8)
        self._logits = cuda_rt.DeviceBuffer(b * m.vocab_size * 4)
        self._exit = {o: cuda_rt.DeviceBuffer(b * 8) for o in self.engines["exit_head"].outputs}
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
        state.attention_mask = np.concatenate([state.attention_mask, step_mask], axis=1)
        position_ids = state.next_position[:, None] + np.cumsum(step_mask, axis=1) - 1
        position_ids = np.maximum(position_ids, 0).astype(np.int64)
        state.next_position = state.next_position + step_mask.sum(axis=1)
        total = state.length
        profile = 0 if past == 0 else 1
        graphs = self.cuda_graphs and profile == 1

        embed = self.engines["embed"]
        self._upload(self._ids, input_ids, embed.dtypes["input_ids"])
        self._upload(self._positions, position_ids, self.engines[m.block_name(0)].dtypes["position_ids"])
        self._upload(self._mask, state.attention_mask, self.engines[m.block_name(0)].dtypes["attention_mask"])
        feeds = {"input_ids": self._ids.ptr, "position_ids": self._positions.ptr, "hidden_states": self._hidden[0].ptr}
        shapes = {"input_ids": (batch, seq), "position_ids": (batch, seq)}
        self._call("embed", profile, {k: shapes[k] for k in embed.inputs},
                   {k: feeds[k] for k in embed.inputs + embed.outputs}, graphs)

        h = m.hidden_size
        kv = (batch, m.num_kv_heads)
        self.last_exit_features = {}
        for layer in range(depth):
            name = m.block_name(layer)
            past_k, past_v = state.cache.past(layer, past)
            present_k, present_v = state.cache.present(layer, total)
            self._call(name, profile,
                       {"hidden_states": (batch, seq, h), "position_ids": (batch, seq), "attention_mask": (batch, total),
                        "past_key": (*kv, past, m.head_dim), "past_value": (*kv, past, m.head_dim)},
                       {"hidden_states": self._hidden[layer % 2].ptr, "position_ids": self._positions.ptr,
                        "attention_mask": self._mask.ptr, "past_key": past_k, "past_value": past_v,
                        "hidden_states_out": self._hidden[(layer + 1) % 2].ptr, "present_key": present_k,
                        "present_value": present_v}, graphs)
            state.cache.lengths[layer] = total
            if layer + 1 in probe_layers:
                rows = self._last_rows(self._hidden[(layer + 1) % 2], batch, seq)
                self.last_exit_features[layer + 1] = self._exit_head(rows, batch, graphs)
        rows = self._last_rows(self._hidden[depth % 2], batch, seq)
        self._call("final_head", 0, {"hidden_states": (batch, h)},
                   {"hidden_states": rows, "logits": self._logits.ptr}, graphs)
        return self._logits

    def _last_rows(self, hidden, batch: int, seq: int) -> int:
        """Device address of (batch, hidden) last-position rows: the buffer itself for one token."""
        if seq == 1:
            return hidden.ptr
        row = self.manifest.hidden_size * 4
        cuda_rt.copy_rows(self._rows.ptr, hidden.ptr + (seq - 1) * row, batch, row, seq * row, self.stream)
        return self._rows.ptr

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

    def final_logits(self, hidden_last: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(hidden_last, dtype=np.float32)
        self._check_rows(rows)
        self._rows.upload(rows, self.stream)
        self._call("final_head", 0, {"hidden_states": rows.shape}, {"hidden_states": self._rows.ptr, "logits": self._logits.ptr}, False)
        out = self._logits.download(np.empty((rows.shape[0], self.manifest.vocab_size), dtype=np.float32), self.stream)
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

    def run_layers(self, *args, **kwargs):
        raise InputError("exit policies run on the onnxruntime backend for now; the tensorrt backend runs full depth "
                         "or a forced depth (forward(..., depth=k))")

    finish_layers = run_layers

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
