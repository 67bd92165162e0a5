"""The `tensorrt` backend: the bundle's engines (built on this device by `adainfer build-engines`)
chained on the GPU through the TensorRT Python API and cuda-python (`cuda_rt`); never torch or pycuda.

Importing this module needs neither: they are imported when a backend is made, and their absence,
an unsupported version (`gpu_versions`), or the absence of a CUDA device is one
`GpuUnavailableError` line.

What stays on the device: hidden states between blocks (two ping-pong buffers), the KV cache
between steps (`kv_buffers.BufferKVCache` in cudaMalloc'd memory: a block reads `past_*` from one
buffer of the pair and writes `present_*` into the other), the last-position rows fed to the
heads (one cudaMemcpy2DAsync), and the exit decision: only its score and top-1 per row come back
(`decide`), and the logits when a step asks for them.

Each engine gets one execution context per optimization profile (0 = prefill, 1 = decode; heads
one), pinned to it with `set_optimization_profile_async`; a call sets input shapes
(`set_input_shape`), tensor addresses (`set_tensor_address`, 256-byte aligned) and enqueues
(`execute_async_v3`); each of those returns False on refusal, which becomes one `EngineError`
line instead of a run on stale addresses. Several tokens on a filled cache fit no profile
(`profiles.choose_profile`), so speculative decoding is refused on this backend. No CUDA graphs:
the cache's addresses alternate per step and its shapes grow, so a captured graph would never
replay within a generation.

One generation at a time per backend: the hidden-state and head buffers are the backend's.
`close()` releases every buffer, context and engine, and the stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ...errors import BundleError, InputError
from .. import cuda_rt
from ..backend import kv_dtype
from ..bundle import Bundle
from ..device_exit import LAYER_FRAC, HIDDEN, PREVIOUS, DeviceDecider, device_decider, extra_features, layer_fractions
from ..device_memory import CudaMemory, DeviceTensor, aligned, check_aligned
from ..engine_record import DECIDER, check_decider, find_engines
from ..gpu_errors import EngineError
from ..kv_buffers import BufferKVCache
from ..profiles import choose_profile


def require_tensorrt():
    """tensorrt and cuda-python of supported versions, and a CUDA device; else one line."""
    trt = cuda_rt.import_tensorrt()
    cuda_rt.require_gpu()
    return trt


class Engine:
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
            if context is None or not context.set_optimization_profile_async(index, cuda_rt.stream_handle(stream)):
                raise EngineError(f"{self.name}: TensorRT cannot make an execution context for profile {index}")
            self.contexts.append(context)

    def run(self, profile: int, shapes: dict, addresses: dict, stream) -> None:
        run_context(self.name, self.contexts[profile], self.inputs, shapes, addresses, stream)

    def close(self) -> None:
        self.contexts = []
        self.engine = None


def run_context(name: str, context, inputs, shapes: dict, addresses: dict, stream) -> None:
    """Set shapes and addresses on one execution context and enqueue it; every refusal TensorRT
    reports (a False return) is one `EngineError` line naming the tensor."""
    for tensor in inputs:
        shape = tuple(int(d) for d in shapes[tensor])
        if not context.set_input_shape(tensor, shape):
            raise EngineError(f"{name}: TensorRT refused shape {shape} for {tensor} (outside the engine's profile?)")
    for tensor, ptr in addresses.items():
        check_aligned(ptr, f"{name} {tensor}")
        if not context.set_tensor_address(tensor, ptr):
            raise EngineError(f"{name}: TensorRT refused the address of {tensor}")
    if not context.execute_async_v3(cuda_rt.stream_handle(stream)):
        raise EngineError(f"{name}: TensorRT failed to enqueue the engine")


def load_engines(trt, bundle: Bundle, stream) -> tuple[dict, dict]:
    """The engine record for this device and every engine it lists (the exit decider's too)."""
    directory, record = find_engines(bundle.root, cuda_rt.device_info())
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines = {}
    blocks_only = [g for g in bundle.manifest.graphs if g not in bundle.manifest.merged_graphs]  # no span or full-step engines
    for graph in [*blocks_only, *([DECIDER] if DECIDER in record["graphs"] else [])]:
        if graph not in record["graphs"]:
            raise EngineError(f"the engine record has no {graph}; rebuild with `adainfer build-engines {bundle.root}`")
        path = directory / record["graphs"][graph]["file"]
        if not path.is_file():
            raise EngineError(f"missing engine {path}; rebuild with `adainfer build-engines {bundle.root}`")
        engines[graph] = Engine(trt, runtime, path, stream)
    return record, engines


class TensorRTBackend:
    name = "tensorrt"
    multi_token_steps = False  # see choose_profile

    def __init__(self, bundle: Bundle, memory=None, engines=None):
        """`memory` and `engines` ((record, {graph: Engine-like})) replace the CUDA memory and the
        deserialized engines: how the conformance suite runs this backend's logic on the CPU."""
        self.bundle, self.manifest = bundle, bundle.manifest
        m = self.manifest
        self.num_layers = m.num_layers
        if engines is None:
            trt = require_tensorrt()
            self.memory = memory if memory is not None else CudaMemory()
            record, engines = load_engines(trt, bundle, self.memory.cuda_stream)
        else:
            record, engines = engines
            self.memory = memory
        self.record, self.engines = record, engines
        self._stream = getattr(self.memory, "cuda_stream", None)
        options = record["options"]
        self.max_batch, self.max_seq, self.max_context = options["max_batch"], options["max_seq"], options["max_context"]
        self.calls: dict[str, int] = {graph: 0 for graph in engines}
        self.kv_dtype = kv_dtype(m)
        if m.num_layers and self.engines[m.block_name(0)].dtypes["present_key"] != self.kv_dtype:
            raise EngineError("the block engines' KV dtype differs from the bundle's; rebuild with `adainfer build-engines`")
        h, b, s = m.hidden_size, self.max_batch, self.max_seq
        alloc = self.memory.alloc
        self._hidden = [alloc(b * s * h * 4), alloc(b * s * h * 4)]
        self._rows = [alloc(b * h * 4), alloc(b * h * 4)]  # the last rows of this block and of the one before
        self._fill = [alloc(b * s * m.num_kv_heads * m.head_dim * self.kv_dtype.itemsize) for _ in range(2)]
        self._ids, self._positions = alloc(b * s * 8), alloc(b * s * 8)
        self._mask = alloc(b * self.max_context * 8)
        self._logits = alloc(b * s * m.vocab_size * 4)
        self._exit = {o: alloc(b * s * 8) for o in self.engines["exit_head"].outputs}
        self._decider_out, self._fractions, self._fraction_stride = {}, None, aligned(b * 4)
        if DECIDER in self.engines:
            self._decider_out = {o: alloc(b * 8) for o in self.engines[DECIDER].outputs}
            self._fractions = alloc(m.num_layers * self._fraction_stride)  # each layer's rows 256-byte aligned
            for layer, rows in enumerate(layer_fractions(m.num_layers, b)):
                self.memory.upload(self._fractions.ptr + layer * self._fraction_stride, rows)
            self.memory.synchronize()
        self._step: Optional[tuple] = None  # (batch, seq, past, profile) of the step being run

    @property
    def has_kv_fill(self) -> bool:
        return self.num_layers == 0 or "kv_fill_00" in self.engines

    # ------------------------------------------------------------------ calls

    def _call(self, graph: str, profile: int, shapes: dict, addresses: dict) -> None:
        self.calls[graph] += 1
        self.engines[graph].run(profile, shapes, addresses, self._stream)

    def _upload(self, buffer, array: np.ndarray, dtype) -> None:
        self.memory.upload(buffer.ptr, np.ascontiguousarray(array, dtype=dtype))

    def _hidden_tensor(self, index: int, batch: int, seq: int) -> DeviceTensor:
        return DeviceTensor(self._hidden[index].ptr, (batch, seq, self.manifest.hidden_size), np.dtype(np.float32),
                            keep=index)

    # ------------------------------------------------------------------ the backend interface

    def new_cache(self, batch: int) -> BufferKVCache:
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds the engines' max batch {self.max_batch} (rebuild with --max-batch)")
        m = self.manifest
        return BufferKVCache(self.memory, m.num_layers, batch, m.num_kv_heads, m.head_dim, self.kv_dtype,
                             self.max_context)

    def embed(self, input_ids, position_ids, cache: BufferKVCache):
        batch, seq = input_ids.shape
        past = cache.length - seq
        if seq > self.max_seq or cache.length > self.max_context:
            raise InputError(f"{cache.length} positions exceed the engines' limits (prompt {self.max_seq}, context "
                             f"{self.max_context}); rebuild with larger --max-seq / --max-context")
        profile = choose_profile(past, seq)
        self._step = (batch, seq, past, profile)
        m, embed = self.manifest, self.engines["embed"]
        block0 = self.engines[m.block_name(0)] if m.num_layers else embed
        self._upload(self._ids, input_ids, embed.dtypes["input_ids"])
        self._upload(self._positions, position_ids, block0.dtypes.get("position_ids", np.int64))
        self._upload(self._mask, cache.attention_mask, block0.dtypes.get("attention_mask", np.int64))
        feeds = {"input_ids": self._ids.ptr, "position_ids": self._positions.ptr, "hidden_states": self._hidden[0].ptr}
        shapes = {"input_ids": (batch, seq), "position_ids": (batch, seq)}
        self._call("embed", profile, {k: shapes[k] for k in embed.inputs}, {k: feeds[k] for k in embed.inputs + embed.outputs})
        return self._hidden_tensor(0, batch, seq)

    def block(self, layer, hidden: DeviceTensor, position_ids, cache: BufferKVCache):
        batch, seq, past, profile = self._step
        m = self.manifest
        total = past + seq
        present_k, present_v = cache.present(layer, total)
        past_k, past_v, cached = cache.past(layer)
        if cached != past:
            raise InputError(f"layer {layer + 1}'s cache holds {cached} positions, this step needs {past}")
        out = 1 - hidden.keep
        kv = (batch, m.num_kv_heads)
        self._call(m.block_name(layer), profile,
                   {"hidden_states": (batch, seq, m.hidden_size), "position_ids": (batch, seq),
                    "attention_mask": (batch, total), "past_key": (*kv, past, m.head_dim), "past_value": (*kv, past, m.head_dim)},
                   {"hidden_states": hidden.ptr, "position_ids": self._positions.ptr, "attention_mask": self._mask.ptr,
                    "past_key": past_k, "past_value": past_v, "hidden_states_out": self._hidden[out].ptr,
                    "present_key": present_k, "present_value": present_v})
        cache.commit(layer, total)
        return self._hidden_tensor(out, batch, seq)

    spans = ()  # TensorRT engines are built per block: single-block segments only

    def segment(self, first, last, hidden: DeviceTensor, position_ids, cache: BufferKVCache):
        if first != last:
            raise BundleError(f"the tensorrt backend runs single blocks, not the span {first}..{last}")
        return self.block(first, hidden, position_ids, cache)

    def kv_fill(self, layer, hidden: DeviceTensor, position_ids, cache: BufferKVCache) -> None:
        batch, seq, _, profile = self._step
        m = self.manifest
        self._call(f"kv_fill_{layer:02d}", profile, {"hidden_states": (batch, seq, m.hidden_size), "position_ids": (batch, seq)},
                   {"hidden_states": hidden.ptr, "position_ids": self._positions.ptr,
                    "key": self._fill[0].ptr, "value": self._fill[1].ptr})
        cache.append(layer, self._fill[0].ptr, self._fill[1].ptr, seq)

    def rows(self, hidden: DeviceTensor, which: str = "last", slot: int = 0) -> DeviceTensor:
        batch, seq, width = hidden.shape
        if which == "all":
            return DeviceTensor(hidden.ptr, (batch * seq, width), hidden.dtype, keep=hidden)
        if seq == 1:
            return DeviceTensor(hidden.ptr, (batch, width), hidden.dtype, keep=hidden)
        row = width * hidden.dtype.itemsize
        into = self._rows[slot]
        self.memory.copy_2d(into.ptr, row, hidden.ptr + (seq - 1) * row, seq * row, row, batch)
        return DeviceTensor(into.ptr, (batch, width), hidden.dtype, keep=into)

    def _rows_on_device(self, rows) -> DeviceTensor:
        if isinstance(rows, DeviceTensor):
            return rows
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.manifest.hidden_size or not 1 <= rows.shape[0] <= self.max_batch:
            raise InputError(f"expected (rows <= {self.max_batch}, {self.manifest.hidden_size}) hidden states, got {rows.shape}")
        self.memory.upload(self._rows[0].ptr, rows)
        return DeviceTensor(self._rows[0].ptr, rows.shape, rows.dtype)

    def logits(self, rows) -> np.ndarray:
        rows = self._rows_on_device(rows)
        self._call("final_head", 0, {"hidden_states": rows.shape}, {"hidden_states": rows.ptr, "logits": self._logits.ptr})
        return self.memory.download(self._logits.ptr, np.empty((rows.shape[0], self.manifest.vocab_size), np.float32))

    def exit_outputs(self, rows):
        rows = self._rows_on_device(rows)
        head = self.engines["exit_head"]
        self._call("exit_head", 0, {"hidden_states": rows.shape},
                   {"hidden_states": rows.ptr, **{o: self._exit[o].ptr for o in head.outputs}})
        return tuple(self.memory.download(self._exit[n].ptr, np.empty(rows.shape[0], dtype=head.dtypes[n]))
                     for n in ("top1_id", "top1_prob", "gap"))

    def host(self, tensor) -> np.ndarray:
        if not isinstance(tensor, DeviceTensor):
            return np.asarray(tensor)
        return self.memory.download(tensor.ptr, np.empty(tensor.shape, dtype=tensor.dtype))

    # ------------------------------------------------------------------ exit decisions on the device

    def make_decider(self, model, policy) -> Optional[DeviceDecider]:
        """The policy as an on-device decider, refused in one line when TensorRT cannot run it, and
        checked against the exit-decider engine's record (built for this calibration)."""
        decider = device_decider(policy, self.num_layers, "tensorrt")
        if decider is not None and decider.graph == DECIDER:
            from ...manifest import sha256_of

            head_file = decider.policy.head_file
            listed = next((a.sha256 for a in self.manifest.attachments.values() if a.file == head_file), None)
            path = self.bundle.root / head_file
            sha = listed or (sha256_of(path) if path.is_file() else None)
            check_decider(self.record, sha, extra_features(decider.policy), self.bundle.root)
        return decider

    def decide(self, decider, layer: int, hidden: DeviceTensor, previous: DeviceTensor):
        if not isinstance(decider, DeviceDecider):
            decider = device_decider(decider, self.num_layers, "tensorrt")
        if decider.graph is None:
            return decider.decide_outputs(layer, {})
        batch = hidden.shape[0]
        current = self.rows(hidden, slot=0)
        if decider.graph == "exit_head":
            top1, prob, gap = self.exit_outputs(current)
            return decider.decide_outputs(layer, {"top1_id": top1, "top1_prob": prob, "gap": gap})
        engine = self.engines[DECIDER]
        m = self.manifest
        shapes = {HIDDEN: (batch, m.hidden_size), PREVIOUS: (batch, m.hidden_size), LAYER_FRAC: (batch, 1)}
        addresses = {}
        if HIDDEN in engine.inputs:
            addresses[HIDDEN] = current.ptr
        if PREVIOUS in engine.inputs:
            addresses[PREVIOUS] = self.rows(previous, slot=1).ptr
        if LAYER_FRAC in engine.inputs:
            addresses[LAYER_FRAC] = self._fractions.ptr + (layer - 1) * self._fraction_stride
        addresses.update({o: self._decider_out[o].ptr for o in engine.outputs})
        self._call(DECIDER, 0, {k: shapes[k] for k in engine.inputs}, addresses)
        out = {name: self.memory.download(self._decider_out[name].ptr, np.empty(batch, dtype=engine.dtypes[name]))
               for name in decider.outputs}  # score: 4 bytes, top1_id: 4 or 8 bytes per row
        return decider.decide_outputs(layer, out)

    # ------------------------------------------------------------------ releasing

    def close(self) -> None:
        """Free every device buffer, execution context and engine, and the stream (idempotent)."""
        buffers = [*self._hidden, *self._rows, *self._fill, self._ids, self._positions, self._mask, self._logits,
                   *self._exit.values(), *self._decider_out.values(), *([self._fractions] if self._fractions else [])]
        for buffer in buffers:
            buffer.free()
        for engine in self.engines.values():
            engine.close()
        self.engines = {}
        self.memory.close()

    def __del__(self):
        try:
            if self.engines:
                self.close()
        except Exception:
            pass


