"""The fused Q4_1 kernel (adainfer/runtime/kernels/q4_1_matmul.c) computes what the int4
export's MatMulNBits + offset term computes: same int8 rounding of x, same exact Q4_1 weights."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adainfer.exporter.gguf_grid import encode_exact

from adainfer.exporter.q4_1_twins import fuse_q4_1
from adainfer.runtime.q4_1_kernel import build, cpu_is_fast


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """The plain C build always, the AVX2/FMA/F16C build where this CPU runs it."""
    out = tmp_path_factory.mktemp("q4_1")
    built = {"plain": build(out, fast=False)}
    if cpu_is_fast():
        built["fast"] = build(out, fast=True)
    return built


def q4_1_model(k: int, n: int, fp16_exact: bool, seed: int) -> onnx.ModelProto:
    """One MatMul x [1, m, k] @ W whose W lies on a Q4_1 grid (d, m as float16 when `fp16_exact`, as a GGUF's)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (k, n))
    q[0::32], q[1::32] = 0, 15  # a Q4_1 block spans its grid: its minimum is m, its maximum m + 15 d
    d = rng.uniform(0.002, 0.02, (k // 32, n)).astype(np.float32)
    low = -rng.uniform(0.0, 0.15, (k // 32, n)).astype(np.float32)
    if fp16_exact:
        d, low = d.astype(np.float16).astype(np.float32), low.astype(np.float16).astype(np.float32)
    w = (np.repeat(d, 32, 0) * q + np.repeat(low, 32, 0)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "m", n])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return encode_exact(model, list(model.graph.node), 32, 4)


def run(model: onnx.ModelProto, x: np.ndarray, library=None, threads: int = 2) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]


def assert_same_in_every_build(libraries, model, fused, x) -> None:
    """The fused graph gives the standard graph's output within 2e-6 of its scale, in each build on 1 and 2 threads."""
    x = x.astype(np.float32)
    want = run(model, x)
    scale = float(np.abs(want).max())
    for name, library in libraries.items():
        for threads in (1, 2):
            got = run(fused, x, library, threads)
            assert got.shape == want.shape
            assert float(np.abs(got - want).max()) <= 2e-6 * scale, (name, threads)


@pytest.mark.parametrize("k, n, rows, fp16_exact", [
    (576, 960, 1, True),     # SmolLM2's q/k/v group, one decode row
    (1536, 576, 3, True),    # down_proj, three rows
    (576, 131, 2, True),     # an odd column count (the last column alone)
    (96, 70, 2, True),       # an odd number of blocks: the plain path in either build
    (576, 200, 1, False),    # d, m not float16: no packed copy, the plain path
])
def test_fused_q4_1_equals_matmulnbits_plus_offset(libraries, k, n, rows, fp16_exact):
    model = q4_1_model(k, n, fp16_exact, seed=k + n)
    assert [node.op_type for node in model.graph.node].count("MatMulNBits") == 1
    fused, groups = fuse_q4_1(onnx.ModelProto.FromString(model.SerializeToString()))
    assert groups == 1 and [node.op_type for node in fused.graph.node] == ["MatMulQ4_1"]
    assert_same_in_every_build(libraries, model, fused, np.random.default_rng(rows).normal(size=(1, rows, k)))


def swiglu_model(k: int, inner: int, fp16_exact: bool, seed: int) -> onnx.ModelProto:
    """An MLP's gate and up projections as one Q4_1 MatMul (as the exporter fuses them), then its SwiGLU:
    Split in halves, Sigmoid, Mul, Mul."""
    model = q4_1_model(k, 2 * inner, fp16_exact, seed)
    graph = model.graph
    graph.node[-1].output[0] = "gate_up"
    graph.initializer.append(numpy_helper.from_array(np.array([inner, inner], np.int64), "halves"))
    graph.node.extend([
        helper.make_node("Split", ["gate_up", "halves"], ["gate", "up"], name="split", axis=-1),
        helper.make_node("Sigmoid", ["gate"], ["gate_sigmoid"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "gate_sigmoid"], ["gate_silu"], name="silu"),
        helper.make_node("Mul", ["gate_silu", "up"], ["y"], name="product")])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "m", inner]))
    return model


@pytest.mark.parametrize("k, inner, rows, fp16_exact", [
    (576, 1536, 1, True),    # SmolLM2's MLP, one decode row
    (576, 67, 3, True),      # an odd half: a task's last gate column alone
    (96, 40, 2, True),       # an odd number of blocks: the plain path
    (576, 100, 1, False),    # d, m not float16: the plain path
])
def test_fused_q4_1_takes_in_the_swiglu_that_reads_it(libraries, k, inner, rows, fp16_exact):
    model = swiglu_model(k, inner, fp16_exact, seed=k + inner)
    fused, groups = fuse_q4_1(onnx.ModelProto.FromString(model.SerializeToString()))
    assert groups == 1 and [node.op_type for node in fused.graph.node] == ["MatMulQ4_1"]
    assert {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}["swiglu"] == 1
    assert "halves" not in {t.name for t in fused.graph.initializer}
    assert_same_in_every_build(libraries, model, fused, np.random.default_rng(rows).normal(size=(1, rows, k)))


def test_a_swiglu_whose_halves_are_read_elsewhere_is_left_to_the_graph(libraries):
    """The gate's values are also a graph output: the Split, Sigmoid and Muls stay, the projection is fused."""
    model = swiglu_model(576, 64, True, seed=3)
    model.graph.output.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, [1, "m", 64]))
    fused, groups = fuse_q4_1(onnx.ModelProto.FromString(model.SerializeToString()))
    assert groups == 1
    assert [node.op_type for node in fused.graph.node] == ["MatMulQ4_1", "Split", "Sigmoid", "Mul", "Mul"]
    x = np.random.default_rng(0).normal(size=(1, 2, 576)).astype(np.float32)
    want = run(model, x)
    got = run(fused, x, next(iter(libraries.values())))
    assert float(np.abs(got - want).max()) <= 2e-6 * float(np.abs(want).max())
