"""ONNX Runtime with I/O binding: hidden states and the KV cache stay where the graphs run.

One backend for three names: `cpu-iobinding` (CPU device: the same binding logic, tested on any
machine), `ort-cuda` (the CUDA execution provider) and `ort-trt` (ONNX Runtime's TensorRT
provider, falling back to CUDA for what it does not take). The KV cache is `kv_buffers.BufferKVCache`
in this backend's memory (`device_memory`: numpy on the CPU, cudaMalloc on a GPU): a block's
`past_*` inputs and `present_*` outputs are bound by address (`IOBinding.bind_input` /
`bind_output` with `buffer_ptr`), so a decode step copies nothing through numpy; hidden states
stay ONNX Runtime values on the device between blocks (`bind_output(name, device)`); the token
ids, positions and mask go up, and only the heads' outputs (logits, or the exit head's three
numbers per row) come back. Exit decisions run on the host (`early_exit.ExitDecider`): two
hidden rows per batch row come down per evaluated layer.

ONNX Runtime silently falls back to the CPU when a provider fails to start: every session is
checked (`sessions.check_providers`) and refused in one line. `onnxruntime` and
`onnxruntime-gpu` installed side by side shadow each other: refused too. The TensorRT provider
gets one profile per graph covering prefill and decode for `max_batch` rows (`profiles.union_profile`)
and caches its engines under `engines/ort-trt/`; precision comes from the bundle's graphs
(export an fp16 bundle for fp16 engines).
"""

from __future__ import annotations

from importlib import metadata
from typing import Optional

import numpy as np

from ...errors import BundleError, InputError
from ..backend import graph_dtype, kv_dtype
from ..bundle import ORT_DTYPES, Bundle
from ..early_exit import HostDecisions
from ..device_memory import DeviceTensor, HostMemory
from ..gpu_errors import GpuUnavailableError
from ..kv_buffers import BufferKVCache
from ..profiles import BuildOptions, graph_profiles, shape_text, union_profile
from .cpu import Sessions, used_spans

NAMES = ("cpu-iobinding", "ort-cuda", "ort-trt")
PROVIDER = {"cpu-iobinding": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
            "ort-trt": "TensorrtExecutionProvider"}
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                         "onnxruntime-silicon", "onnxruntime-qnn")


def check_single_onnxruntime(installed=None) -> None:
    """Refuse two ONNX Runtime distributions in one environment (they install the same module)."""
    if installed is None:
        installed = {d.metadata["Name"].lower() for d in metadata.distributions() if d.metadata["Name"]}
    found = sorted(n for n in installed if n in RUNTIME_DISTRIBUTIONS)
    if len(found) > 1:
        raise GpuUnavailableError(f"{' and '.join(found)} are both installed and shadow each other: uninstall all "
                                  f"but onnxruntime-gpu (pip uninstall {' '.join(n for n in found if n != 'onnxruntime-gpu')})")


def providers_for(bundle: Bundle, graph: str, backend: str, device_id: int = 0, max_batch: int = 1) -> list:
    if backend == "cpu-iobinding":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if backend == "ort-cuda":
        return [cuda]
    spec = bundle.manifest.graphs[graph]
    options = BuildOptions(max_batch=max_batch).resolved(bundle.manifest)
    profile = union_profile(graph_profiles(graph, spec, options))
    texts = [",".join(f"{n}:{shape_text(s[i])}" for n, s in profile.shapes.items()) for i in range(3)]
    cache = str(bundle.root / "engines" / "ort-trt")
    trt = {"device_id": device_id, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
           "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
           "trt_profile_min_shapes": texts[0], "trt_profile_opt_shapes": texts[1], "trt_profile_max_shapes": texts[2]}
    return [("TensorrtExecutionProvider", trt), cuda]


class IoBindingBackend(HostDecisions):
    def __init__(self, bundle: Bundle, name: str = "cpu-iobinding", device_id: int = 0, threads: Optional[int] = None,
                 max_batch: int = 1, memory=None, spans: bool = True):
        import onnxruntime as ort

        if name not in NAMES:
            raise InputError(f"unknown I/O-binding backend {name!r} (choose from {', '.join(NAMES)})")
        self._ort = ort
        self.name, self.device_id, self.max_batch = name, device_id, max_batch
        self.bundle, self.manifest = bundle, bundle.manifest
        m = self.manifest
        self.num_layers = m.num_layers
        if name != "cpu-iobinding":
            check_single_onnxruntime()
            if PROVIDER[name] not in ort.get_available_providers():
                raise GpuUnavailableError(f"this onnxruntime has no {PROVIDER[name]} (install onnxruntime-gpu; on Jetson "
                                          f"from the Jetson channels, see docs/jetson.md)")
            if name == "ort-trt":
                (bundle.root / "engines" / "ort-trt").mkdir(parents=True, exist_ok=True)
        if memory is None:
            from ..device_memory import CudaMemory

            memory = HostMemory() if name == "cpu-iobinding" else CudaMemory(device_id, synchronous=True)
        self.memory = memory
        self.device = memory.device
        self.spans = used_spans(m, spans and name != "ort-trt")  # TensorRT's provider: one profile set per block graph
        self.span_graphs = m.spans  # (first, last) -> graph name, read once (not per token)
        # the CPU provider's threads spin during a run as the cpu backend's do; a GPU provider's CPU threads
        # have nothing to spin for (on a Jetson they would take cores from the rest of the application)
        self.sessions = Sessions(bundle, lambda graph: providers_for(bundle, graph, name, device_id, max_batch), threads,
                                 require=PROVIDER[name], spans=self.spans, spinning=name == "cpu-iobinding")
        self.calls: dict[str, int] = {g: 0 for g in m.graphs}
        self.kv_dtype = kv_dtype(m)
        self.hidden_dtype = graph_dtype(m, "embed", "hidden_states")

    @property
    def has_kv_fill(self) -> bool:
        return self.num_layers == 0 or "kv_fill_00" in self.sessions

    # ------------------------------------------------------------------ binding

    def _value(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _bind(self, binding, name: str, tensor) -> None:
        if isinstance(tensor, DeviceTensor):
            binding.bind_input(name, self.device, self.device_id, np.dtype(tensor.dtype).type, list(tensor.shape), tensor.ptr)
        else:
            binding.bind_ortvalue_input(name, self._value(tensor))

    def _run(self, graph: str, binding, outputs) -> dict:
        """Run a bound graph; its outputs by name (`outputs`: the names in the order they were bound,
        which is the order `get_outputs` follows)."""
        self.calls[graph] += 1
        self.sessions[graph].run_with_iobinding(binding)
        return dict(zip(outputs, binding.get_outputs()))

    def _tensor(self, value) -> DeviceTensor:
        return DeviceTensor(value.data_ptr(), tuple(value.shape()), self.hidden_dtype, keep=value)

    def _step_values(self, cache, position_ids: np.ndarray):
        """Positions and mask of the current step as values on the device, made once per step."""
        step = getattr(cache, "_step", None)
        if step is None or step[0] is not position_ids:
            mask = cache.attention_mask if cache is not None else np.ones_like(position_ids)
            step = (position_ids, self._value(position_ids), self._value(mask))
            if cache is not None:
                cache._step = step
        return step[1], step[2]

    # ------------------------------------------------------------------ the backend interface

    def new_cache(self, batch: int) -> BufferKVCache:
        if self.name == "ort-trt" and batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds the TensorRT provider's profile (max batch {self.max_batch}; "
                             f"load with max_batch={batch})")
        m = self.manifest
        return BufferKVCache(self.memory, m.num_layers, batch, m.num_kv_heads, m.head_dim, self.kv_dtype, m.max_positions)

    def embed(self, input_ids, position_ids, cache):
        b = self.sessions["embed"].io_binding()
        b.bind_ortvalue_input("input_ids", self._value(np.asarray(input_ids, dtype=np.int64)))
        if "position_ids" in self.sessions.inputs["embed"]:
            b.bind_ortvalue_input("position_ids", self._step_values(cache, position_ids)[0])
        b.bind_output("hidden_states", self.device, self.device_id)
        return self._tensor(self._run("embed", b, ["hidden_states"])["hidden_states"])

    def block(self, layer, hidden: DeviceTensor, position_ids, cache: BufferKVCache):
        return self.segment(layer, layer, hidden, position_ids, cache)

    def segment(self, first, last, hidden: DeviceTensor, position_ids, cache: BufferKVCache):
        """Blocks `first..last` as one graph (a span, or one block): every layer's past and present bound by address."""
        name = self.manifest.block_name(first) if first == last else self.span_graphs[(first, last)]
        total = cache.length
        layers = range(first, last + 1)
        presents = [cache.present(layer, total) for layer in layers]  # first: they may grow the buffers
        positions, mask = self._step_values(cache, position_ids)
        dtype = self.kv_dtype.type
        b = self.sessions[name].io_binding()
        self._bind(b, "hidden_states", hidden)
        b.bind_ortvalue_input("position_ids", positions)
        b.bind_ortvalue_input("attention_mask", mask)
        bound = []
        for layer, (present_k, present_v) in zip(layers, presents):
            past_k, past_v, past = cache.past(layer)
            if past != total - position_ids.shape[1]:
                raise InputError(f"layer {layer + 1}'s cache holds {past} positions, this step needs "
                                 f"{total - position_ids.shape[1]} (an early exit's skipped layers were not filled)")
            suffix = "" if first == last else f"_{layer:02d}"
            b.bind_input(f"past_key{suffix}", self.device, self.device_id, dtype, list(cache.shape(past)), past_k)
            b.bind_input(f"past_value{suffix}", self.device, self.device_id, dtype, list(cache.shape(past)), past_v)
            b.bind_output(f"present_key{suffix}", self.device, self.device_id, dtype, list(cache.shape(total)), present_k)
            b.bind_output(f"present_value{suffix}", self.device, self.device_id, dtype, list(cache.shape(total)), present_v)
            bound += [f"present_key{suffix}", f"present_value{suffix}"]
        b.bind_output("hidden_states_out", self.device, self.device_id)
        out = self._run(name, b, bound + ["hidden_states_out"])
        for layer in layers:
            cache.commit(layer, total)
        return self._tensor(out["hidden_states_out"])

    def kv_fill(self, layer, hidden: DeviceTensor, position_ids, cache: BufferKVCache) -> None:
        graph = f"kv_fill_{layer:02d}"
        b = self.sessions[graph].io_binding()
        self._bind(b, "hidden_states", hidden)
        b.bind_ortvalue_input("position_ids", self._step_values(cache, position_ids)[0])
        for out in self.sessions.outputs[graph]:
            b.bind_output(out, self.device, self.device_id)
        out = self._run(graph, b, self.sessions.outputs[graph])
        key, value = out["key"], out["value"]
        if np.dtype(ORT_DTYPES.get(key.data_type(), key.data_type())) != self.kv_dtype:
            raise BundleError(f"{graph} gives keys of another dtype than the {self.kv_dtype} cache (re-export the bundle)")
        cache.append(layer, key.data_ptr(), value.data_ptr(), position_ids.shape[1])

    def rows(self, hidden: DeviceTensor, which: str = "last") -> DeviceTensor:
        batch, seq, width = hidden.shape
        if which == "all":
            return DeviceTensor(hidden.ptr, (batch * seq, width), hidden.dtype, keep=hidden)
        if seq == 1:
            return DeviceTensor(hidden.ptr, (batch, width), hidden.dtype, keep=hidden)
        row = width * np.dtype(hidden.dtype).itemsize
        buffer = self.memory.alloc(batch * row)
        self.memory.copy_2d(buffer.ptr, row, hidden.ptr + (seq - 1) * row, seq * row, row, batch)
        return DeviceTensor(buffer.ptr, (batch, width), hidden.dtype, keep=buffer)

    def _head(self, graph: str, rows) -> dict:
        b = self.sessions[graph].io_binding()
        self._bind(b, "hidden_states", rows if isinstance(rows, DeviceTensor) else np.asarray(rows, dtype=np.float32))
        for out in self.sessions.outputs[graph]:
            b.bind_output(out, "cpu")
        return {k: v.numpy() for k, v in self._run(graph, b, self.sessions.outputs[graph]).items()}

    def logits(self, rows) -> np.ndarray:
        return self._head("final_head", rows)["logits"]

    def exit_outputs(self, rows):
        out = self._head("exit_head", rows)
        return out["top1_id"], out["top1_prob"], out["gap"]

    def host(self, tensor) -> np.ndarray:
        if not isinstance(tensor, DeviceTensor):
            return np.asarray(tensor)
        self.memory.synchronize()
        return self.memory.download(tensor.ptr, np.empty(tensor.shape, dtype=tensor.dtype))

    def close(self) -> None:
        self.sessions.close()
        self.memory.close()
