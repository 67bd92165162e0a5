"""Why 8-bit MatMulNBits was slow: one SmolLM2-sized MatMul (K=576 -> N=1536, one row) as float32 MatMul and as
MatMulNBits at 4 and 8 bits, accuracy level 0 (float32 compute) and 4 (int8 compute), 2 threads, no spinning.

    .venv/bin/python tools/nbits_micro.py [--calls 500] [--repeats 5]

Prints microseconds per call (median of the repeats) and the largest error against float32. On a 2-core
AMD EPYC (AVX2), onnxruntime 1.31.1: float32 85, 8-bit level 0 7530, 8-bit level 4 67, 4-bit level 0 215,
4-bit level 4 61 (see docs/quantization.md for why: ComputeBUnpacked).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

K, N = 576, 1536


def float_graph(w: np.ndarray):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    models = {"float32 MatMul": float_graph(w)}
    for bits in (4, 8):
        for level in (0, 4):
            config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, accuracy_level=level)
            quantizer = MatMulNBitsQuantizer(float_graph(w), bits=bits, block_size=32, is_symmetric=True,
                                             accuracy_level=level, algo_config=config)
            quantizer.process()
            models[f"MatMulNBits {bits} bits, accuracy level {level}"] = quantizer.model.model
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    x = rng.normal(size=(1, K)).astype(np.float32)
    sessions = {k: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for k, m in models.items()}
    reference = x @ w
    times = {k: [] for k in sessions}
    for _ in range(args.repeats):  # interleaved: every node once per repeat
        for name, session in sessions.items():
            session.run(None, {"x": x})
            started = time.perf_counter()
            for _ in range(args.calls):
                session.run(None, {"x": x})
            times[name].append((time.perf_counter() - started) / args.calls * 1e6)
    print("| node | µs per call | max error vs float32 |\n|---|---|---|")
    for name, session in sessions.items():
        error = float(np.abs(session.run(None, {"x": x})[0] - reference).max())
        print(f"| {name} | {statistics.median(times[name]):.1f} | {error:.4f} |")


if __name__ == "__main__":
    main()
