"""TensorRT engines stood in for by ONNX Runtime on the CPU, behind TensorRT's execution-context API.

`TensorRTBackend(bundle, memory=HostMemory(), engines=fake_engines(bundle, options))` runs the
tensorrt backend's own code (profile choice, shapes and addresses set on contexts, the KV cache
ping-pong, kv_fill appends, the exit decider on the device, row copies) with every "engine" a
session over the bundle's ONNX graph that reads its inputs from, and writes its outputs to, the
addresses the backend bound. Each context checks shapes against its optimization profile (min /
max) and addresses for TensorRT's 256-byte alignment, and returns False on a refusal, as
TensorRT does. What this cannot show: TensorRT's kernels, parser and numerics (GPU only).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnxruntime as ort

from adainfer.runtime.backends.tensorrt import Engine
from adainfer.runtime.bundle import ORT_DTYPES
from adainfer.runtime.engine_record import DECIDER, decider_source
from adainfer.runtime.profiles import graph_profiles


def view(ptr: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) if len(shape) else 1
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine: "FakeEngine", profile):
        self.engine, self.profile = engine, profile
        self.shapes, self.addresses = {}, {}
        self.refusals = []

    def set_input_shape(self, name, shape):
        lo, _, hi = self.profile.shapes[name]
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            self.refusals.append((name, tuple(shape)))
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        if name not in self.engine.inputs + self.engine.outputs or ptr % 256:
            self.refusals.append((name, ptr))
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        e = self.engine
        if any(n not in self.addresses for n in e.inputs + e.outputs) or any(n not in self.shapes for n in e.inputs):
            return False
        feeds = {n: view(self.addresses[n], self.shapes[n], e.dtypes[n]).copy() for n in e.inputs}
        for name, array in zip(e.outputs, e.session.run(e.outputs, feeds)):
            array = np.ascontiguousarray(array, dtype=e.dtypes[name])
            ctypes.memmove(self.addresses[name], array.ctypes.data, array.nbytes)
        e.executions += 1
        return True


class FakeEngine:
    run = Engine.run
    close = Engine.close

    def __init__(self, name: str, session, profiles):
        self.name, self.session = name, session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]
        self.dtypes = {a.name: np.dtype(ORT_DTYPES[a.type]) for a in (*session.get_inputs(), *session.get_outputs())}
        self.contexts = [FakeContext(self, p) for p in profiles]
        self.executions = 0


def fake_engines(bundle_root: Path, options, decider: bool = True) -> tuple[dict, dict]:
    """(engine record, {graph: FakeEngine}) for a bundle, as `load_engines` returns on a GPU."""
    from adainfer.manifest import Manifest

    root = Path(bundle_root)
    manifest = Manifest.load(root)
    options = options.resolved(manifest)
    engines, graphs = {}, {}
    for graph, spec in manifest.graphs.items():
        session = ort.InferenceSession(str(root / spec.file), providers=["CPUExecutionProvider"])
        profiles = graph_profiles(graph, spec, options)
        engines[graph] = FakeEngine(graph, session, profiles)
        graphs[graph] = {"file": f"{graph}.plan", "profiles": [p.to_dict() for p in profiles]}
    if decider:
        from adainfer.engines.decider import bundle_folded_policy, decider_model, extra_features, write_decider

        found = bundle_folded_policy(root, manifest)
        if found is not None:
            policy, folded, sha = found
            model = decider_model(folded, policy, manifest.hidden_size)
            spec = write_decider(folded, policy, manifest.hidden_size, root / ".fake_decider.onnx")
            (root / ".fake_decider.onnx").unlink()
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            engines[DECIDER] = FakeEngine(DECIDER, session, graph_profiles(DECIDER, spec, options))
            graphs[DECIDER] = {"file": "exit_decider.plan", "source": decider_source(sha, extra_features(policy))}
    record = {"options": options.to_dict(), "graphs": graphs}
    return record, engines
