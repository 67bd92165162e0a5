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


def refine_tail_model(vocab: int, k: int, candidates: int, seed: int) -> onnx.ModelProto:
    """A refined 8-bit LM head (`head_refine.refine_heads`) whose coarse logits are an input (so ties can be
    given): coarse [2, vocab], x [2, k] -> logits [2, vocab]."""
    from adainfer.exporter.head_refine import refine_heads

    rng = np.random.default_rng(seed)
    table = rng.integers(1, 256, (vocab, k // 32, 32), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (vocab * (k // 32),)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["logits"], name="head", domain="com.microsoft",
                            K=k, N=vocab, bits=8, block_size=32, accuracy_level=4)
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, vocab])],
                              [numpy_helper.from_array(table, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    model = refine_heads(model, candidates)
    coarse = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    model.graph.node.remove(coarse)
    model.graph.input.append(helper.make_tensor_value_info(coarse.output[0], TensorProto.FLOAT, [2, vocab]))
    return model


@pytest.mark.parametrize("vocab, k, candidates", [
    (300, 64, 7),     # a vocabulary not a multiple of 8: the scan's and the cap's plain tails
    (2048, 576, 64),  # SmolLM2's hidden size and candidate count
    (40, 96, 40),     # every token a candidate
    (50, 64, 1),      # one
])
def test_fused_head_refine_equals_the_refine_tail(libraries, vocab, k, candidates):
    """`adainfer.HeadRefine` gives the eight-node tail's logits (within 2e-6 of their scale: the re-scored sums in
    another order; the same candidates, the rest capped exactly, the same argmax), with coarse logits full of ties
    (rounded to integers: TopK takes the lower index), on 1 and 2 threads in each build; a tail whose values something
    else reads is left to the graph."""
    from adainfer.exporter.q4_1_twins import fuse_head_refine

    model = refine_tail_model(vocab, k, candidates, seed=vocab + k)
    fused, count = fuse_head_refine(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 1 and [n.op_type for n in fused.graph.node] == ["HeadRefine"]
    rng = np.random.default_rng(candidates)
    feeds = {"x": rng.normal(size=(2, k)).astype(np.float32),
             model.graph.input[-1].name: np.round(rng.normal(size=(2, vocab)) * 1.5).astype(np.float32)}

    def run_feeds(m, library=None, threads=2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if library is not None:
            options.register_custom_ops_library(str(library))
        return ort.InferenceSession(m.SerializeToString(), options).run(None, feeds)[0]

    coarse = feeds[model.graph.input[-1].name]
    if candidates + 2 <= vocab:  # row 0: the heap full of 1s, then a 5 and a tying 1 in one 8-wide compare
        coarse[0] = -5.0
        coarse[0, :candidates] = coarse[0, candidates + 1] = 1.0
        coarse[0, candidates] = 5.0
    top = np.argsort(-coarse, axis=-1, kind="stable")[:, :candidates]  # TopK's choice among ties: lower index
    others = np.ones_like(coarse, dtype=bool)
    np.put_along_axis(others, top, False, axis=-1)

    def capped(logits):  # every logit but the candidates': the coarse one, capped at the lowest re-scored one
        floor = np.take_along_axis(logits, top, axis=-1).min(axis=-1, keepdims=True)
        return np.minimum(coarse, floor)[others]

    want = run_feeds(model)
    assert np.array_equal(want[others], capped(want))
    for name, library in libraries.items():
        for threads in (1, 2):
            got = run_feeds(fused, library, threads)
            assert got.shape == want.shape
            assert float(np.abs(got - want).max()) <= 2e-6 * float(np.abs(want).max()), (name, threads)
            assert np.array_equal(got[others], capped(got)), (name, threads)  # the same candidates, ties included
            assert np.array_equal(got.argmax(-1), want.argmax(-1))
    read = onnx.ModelProto.FromString(model.SerializeToString())
    read.graph.output.append(helper.make_tensor_value_info(
        next(n for n in read.graph.node if n.op_type == "ReduceMin").output[0], TensorProto.FLOAT, None))
    assert fuse_head_refine(read)[1] == 0
