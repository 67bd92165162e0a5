"""Can MatMulNBits carry a GGUF Q4_1 block minimum itself? One SmolLM2-sized MatMul (K=576 -> N, one row) on a
Q4_1 grid: float32; 4-bit with float zero points (exact: w = d*(q - zp), zp = -m/d); 4-bit + the float offset
term `gguf_grid.py` writes (exact); 4-bit with rounded uint8 zero points (off by up to d/2 per block); 2 threads.

    .venv/bin/python tools/nbits_zero_point_micro.py [N]

Measured (load ~4, N=1536): float32 101 us, float zero points 948 us (ONNX Runtime's unpacked path),
offset term 79 us, uint8 zero points 70 us (max error 1.95 where |y| <= 4.3); N=49152: 8221 / 136349 / 1490 / 1541 us.
"""
import sys, time, statistics
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
from adainfer.exporter.gguf_grid import _nbits_node
K, N = 576, int(sys.argv[1]) if len(sys.argv) > 1 else 1536
rng = np.random.default_rng(0)
q = rng.integers(0, 16, (K, N)).astype(np.uint8)
d = rng.uniform(0.001, 0.01, (K // 32, N)).astype(np.float32)
m = -rng.uniform(0.0, 0.1, (K // 32, N)).astype(np.float32)
w = (np.repeat(d, 32, 0) * q + np.repeat(m, 32, 0)).astype(np.float32)
def model(nodes, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])], inits)
    mm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    mm.ir_version = 8
    return mm
models = {}
models["fp32"] = model([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")])
# float zero points: w = d * (q - zp), zp = -m / d
zp = (-m / d).astype(np.float32)
node, inits = _nbits_node("nb", "x", "y", q, d, 4, 32, 4, zp.T.reshape(-1).copy())
models["nbits4 float zp"] = model([node], inits)
# offset branch (today's)
node, inits = _nbits_node("nb", "x", "yq", q, d, 4, 32, 4, None)
mm8 = m + 8 * d
inits += [numpy_helper.from_array(np.array([0, K // 32, 32], np.int64), "shape"), numpy_helper.from_array(np.array([-1], np.int64), "ax"), numpy_helper.from_array(mm8, "mins")]
models["nbits4 + offset"] = model([node, helper.make_node("Reshape", ["x", "shape"], ["xb"]), helper.make_node("ReduceSum", ["xb", "ax"], ["xs"], keepdims=0),
                                   helper.make_node("MatMul", ["xs", "mins"], ["off"]), helper.make_node("Add", ["yq", "off"], ["y"])], inits)
# uint8 zero point rounded (packed 4-bit)
zpi = np.clip(np.rint(-m / d), 0, 15).astype(np.uint8)  # (K/32, N)
zt = zpi.T  # N, K/32
nb = K // 32
pad = zt if nb % 2 == 0 else np.concatenate([zt, np.zeros((N, 1), np.uint8)], 1)
packed = (pad[:, 0::2] | (pad[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
node, inits = _nbits_node("nb", "x", "y", q, d, 4, 32, 4, packed)
models["nbits4 uint8 zp (rounded)"] = model([node], inits)
node, inits = _nbits_node("nb", "x", "y", q, d, 4, 32, 4, None)
models["nbits4 no zp (wrong, speed only)"] = model([node], inits)
o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.add_session_config_entry("session.intra_op.allow_spinning", "0"); o.log_severity_level=3
x = rng.normal(size=(1, K)).astype(np.float32)
S = {k: ort.InferenceSession(v.SerializeToString(), o, providers=["CPUExecutionProvider"]) for k, v in models.items()}
ref = x.astype(np.float64) @ w.astype(np.float64)
T = {k: [] for k in S}
for _ in range(5):
    for k, s in S.items():
        s.run(None, {"x": x}); t = time.perf_counter()
        for _ in range(200): s.run(None, {"x": x})
        T[k].append((time.perf_counter() - t) / 200 * 1e6)
for k, s in S.items():
    print(f"{k:34s} {statistics.median(T[k]):8.1f} us  max err {np.abs(s.run(None, {'x': x})[0] - ref).max():.4f} (|y| max {np.abs(ref).max():.2f})")
