"""Same-input projections fused (projections.py: before quantizing, and at load in merged graphs); int4's `grid` and
`head_bits` options (quantize.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adainfer.errors import ExportError
from adainfer.exporter import quantize
from adainfer.exporter.projections import fuse_projections_at_load

K = 128


def _q4_1(rng, n: int) -> np.ndarray:
    """A (K, n) weight on a Q4_1 grid (w = d*q + m per block of 32 along K), every block spanning its grid."""
    q = rng.integers(0, 16, (K // 32, 32, n))
    q[:, 0, :], q[:, 1, :] = 0, 15
    d, m = rng.uniform(0.01, 0.05, (K // 32, 1, n)), rng.uniform(-0.4, -0.1, (K // 32, 1, n))
    return (d * q + m).reshape(K, n).astype(np.float32)


def _projections(weights: dict[str, np.ndarray], other: np.ndarray) -> onnx.ModelProto:
    """y_* = x @ W_* for every weight (all read x, like q/k/v), z = (x @ W_q) @ other (reads another input)."""
    nodes = [helper.make_node("MatMul", ["x", f"W_{k}"], [f"y_{k}"], name=f"mm_{k}") for k in weights]
    nodes.append(helper.make_node("MatMul", ["y_q", "W_other"], ["z"], name="mm_other"))
    inits = [numpy_helper.from_array(w, f"W_{k}") for k, w in weights.items()]
    inits.append(numpy_helper.from_array(other, "W_other"))
    outputs = [helper.make_tensor_value_info(f"y_{k}", TensorProto.FLOAT, ["b", "s", w.shape[1]])
               for k, w in weights.items()]
    outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "s", other.shape[1]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _optimized(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    """`model` as ONNX Runtime's CPU session leaves it after its graph optimizations (what runs)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def test_fusing_at_load_adds_no_weight_bytes_and_onnx_runtime_folds_the_concat(tmp_path):
    """The merged graphs' form: a Concat of the very initializers the MatMuls read (no new weight tensor, so a graph
    pointing into the blocks' files stays that small), which ONNX Runtime folds when the session loads: what runs is
    one MatMul on a (K, 128) constant and a Split; outputs equal the unfused graph's."""
    rng = np.random.default_rng(1)
    weights = {k: rng.normal(size=(K, n)).astype(np.float32) for k, n in (("q", 64), ("k", 32), ("v", 32))}
    model = _projections(weights, rng.normal(size=(64, 16)).astype(np.float32))
    x = rng.normal(size=(1, 5, K)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    fused = fuse_projections_at_load(model)
    assert [n.op_type for n in fused.graph.node] == ["Concat", "MatMul", "Split", "MatMul"]
    assert list(fused.graph.node[0].input) == ["W_q", "W_k", "W_v"]
    assert {t.name for t in fused.graph.initializer} == {"W_q", "W_k", "W_v", "W_other", "mm_q_fused_split"}
    assert [int(v) for v in numpy_helper.to_array(next(t for t in fused.graph.initializer
                                                        if t.name == "mm_q_fused_split"))] == [64, 32, 32]
    ran = _optimized(fused, tmp_path)
    assert "Concat" not in [n.op_type for n in ran.graph.node]
    consts = {t.name: t for t in ran.graph.initializer}
    reading_x = [n for n in ran.graph.node if "x" in n.input]
    assert len(reading_x) == 1 and tuple(consts[reading_x[0].input[1]].dims) == (K, 128)
    got = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_fusing_at_load_takes_float16_weights_and_skips_a_different_k():
    """Float16 projections (an fp16 graph's) fuse too; MatMuls on one input with different K (not projections of
    one vector) do not; a MatMul whose B is computed, not a constant, is left alone."""
    rng = np.random.default_rng(2)
    half = {k: rng.normal(size=(K, n)).astype(np.float16) for k, n in (("a", 16), ("b", 8))}
    nodes = [helper.make_node("MatMul", ["x", f"W_{k}"], [f"y_{k}"], name=f"mm_{k}") for k in half]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, K])],
                              [helper.make_tensor_value_info(f"y_{k}", TensorProto.FLOAT16, [1, w.shape[1]])
                               for k, w in half.items()], [numpy_helper.from_array(w, f"W_{k}") for k, w in half.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [n.op_type for n in fuse_projections_at_load(model).graph.node] == ["Concat", "MatMul", "Split"]
    mixed = [numpy_helper.from_array(rng.normal(size=(K, 8)).astype(np.float32), "W_a"),
             numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "W_b")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W_a"], ["y_a"], name="mm_a"),
                               helper.make_node("MatMul", ["x", "W_b"], ["y_b"], name="mm_b"),
                               helper.make_node("MatMul", ["x", "y_a"], ["y_c"], name="mm_c")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, K])], [], mixed)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [n.op_type for n in fuse_projections_at_load(model).graph.node] == ["MatMul"] * 3


def test_fuse_projections_is_exact_and_leaves_other_inputs_alone():
    rng = np.random.default_rng(0)
    weights = {k: rng.normal(size=(K, n)).astype(np.float32) for k, n in (("q", 64), ("k", 32), ("v", 32))}
    model = _projections(weights, rng.normal(size=(64, 16)).astype(np.float32))
    x = rng.normal(size=(2, 3, K)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    fused = quantize.fuse_projections(model)  # (projections.py)
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["MatMul", "Split", "MatMul"], ops  # q, k, v in one; the MatMul on y_q stays
    assert {t.name for t in fused.graph.initializer} == {"mm_q_fused_weight", "mm_q_fused_split", "W_other"}
    got = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_fuse_projections_keeps_weights_of_different_kinds_apart():
    """With a kind per weight (the GGUF grid it lies on), only weights of one kind are fused."""
    from adainfer.exporter.gguf_grid import grid_kind

    rng = np.random.default_rng(1)
    weights = {"q": _q4_1(rng, 32), "k": _q4_1(rng, 32), "v": rng.normal(size=(K, 32)).astype(np.float32)}
    fused = quantize.fuse_projections(_projections(weights, rng.normal(size=(32, 8)).astype(np.float32)), grid_kind)
    matmuls = [n for n in fused.graph.node if n.op_type == "MatMul"]
    assert [n.name for n in matmuls] == ["mm_q_fused", "mm_v", "mm_other"]


def test_int4_fuses_grid_projections_into_one_exact_matmulnbits(tmp_path):
    """q/k/v on a Q4_1 grid: one MatMulNBits and one offset term (not three), still the exact encoding: error of
    the activations' int8 rounding only, far below rounding the weights again (grid="rtn")."""
    rng = np.random.default_rng(2)
    weights = {"q": _q4_1(rng, 64), "k": _q4_1(rng, 32), "v": _q4_1(rng, 32)}
    src = tmp_path / "proj.onnx"
    onnx.save(_projections(weights, rng.normal(size=(64, 16)).astype(np.float32)), str(src))
    x = rng.normal(size=(1, 3, K)).astype(np.float32)
    want = [x @ w for w in weights.values()]
    errors = {}
    for grid in ("gguf", "rtn"):
        out = tmp_path / f"{grid}.onnx"
        quantize.convert(src, out, "int4", grid=grid)
        nodes = onnx.load(str(out)).graph.node
        assert sum(n.op_type == "MatMulNBits" for n in nodes) == 2  # q/k/v fused, plus the MatMul on y_q
        assert sum(n.op_type == "Split" for n in nodes) == 1
        offsets = [n for n in nodes if n.name.endswith("_gguf_offset")]
        assert len(offsets) == (1 if grid == "gguf" else 0)
        got = _run(out, x)[:3]
        errors[grid] = max(np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got, want))
    assert errors["gguf"] < 0.02 and errors["rtn"] > 3 * errors["gguf"], errors


def test_head_bits_sets_the_bits_of_a_q8_0_head(tmp_path):
    """An int4 bundle's head on a Q8_0 grid stays 8-bit and exact by default; bits=4 rounds it to 4 bits."""
    rng = np.random.default_rng(3)
    q8 = rng.integers(-127, 128, (K // 32, 32, 96))
    q8[:, 0, :] = 127
    w = (rng.uniform(0.001, 0.01, (K // 32, 1, 96)) * q8).reshape(K, 96).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="head")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 96])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "head.onnx"
    onnx.save(model, str(src))
    x = rng.normal(size=(4, K)).astype(np.float32)
    errors = {}
    for bits in (None, 8, 4):
        out = tmp_path / f"head{bits}.onnx"
        quantize.convert(src, out, "int4", bits=bits)
        (node,) = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"]
        assert {a.name: a.i for a in node.attribute}["bits"] == (bits or 8)
        errors[bits] = np.linalg.norm(_run(out, x)[0] - x @ w) / np.linalg.norm(x @ w)
    assert errors[None] == errors[8] < 0.02 and errors[4] > 3 * errors[8], errors


def test_bad_grid_and_head_bits_are_refused(tmp_path):
    with pytest.raises(ExportError, match="unknown grid 'nearest'"):
        quantize.convert(tmp_path / "none.onnx", tmp_path / "out.onnx", "int4", grid="nearest")
    with pytest.raises(ExportError, match="unsupported head bits 3"):
        quantize.check_head_bits(3)


def test_fp32_bundle_with_8_bit_heads_keeps_float_blocks_and_passes_its_quality_check(stories_hf, tmp_path):
    """`precision="fp32", head_bits=8`: the exit and final heads become 8-bit MatMulNBits (one tied weight, stored
    once), the embedding and every block stay float32 (byte for byte), the chain's logits stay close to float32's
    and the manifest records the heads' bits and the quality check against its stated thresholds."""
    import adainfer.runtime as rt
    from adainfer.exporter import export_model
    from adainfer.exporter.quality import THRESHOLDS
    from conftest import STORIES_DIR

    plain = export_model(stories_hf, tmp_path / "fp32", model_dir=STORIES_DIR)
    manifest = export_model(stories_hf, tmp_path / "head8", model_dir=STORIES_DIR, precision="fp32", head_bits=8)
    def weights(bundle, name):
        model = onnx.load(str(tmp_path / bundle / plain.graphs[name].file))  # external data (shared file) included
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}, [n.op_type for n in model.graph.node]

    for name in ("embed", *manifest.block_names):
        assert manifest.graphs[name].precision == "fp32"
        (a, ops_a), (b, ops_b) = weights("fp32", name), weights("head8", name)
        assert ops_a == ops_b and a.keys() == b.keys(), name
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    for name in ("exit_head", "final_head"):
        assert manifest.graphs[name].precision == "int8"
        model = onnx.load(str(tmp_path / "head8" / manifest.graphs[name].file))
        (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert {a.name: a.i for a in node.attribute}["bits"] == 8
    info = manifest.extras["quantization"]
    assert info["precision"] == "fp32" and info["head_bits"] == 8
    assert (info["quality"]["min_top1_agreement"], info["quality"]["max_perplexity_ratio"]) == THRESHOLDS["fp32-head8"]
    assert info["quality"]["top1_agreement"] >= 0.95
    prompts = [[1, 5, 9, 30, 7], [1, 200, 3]]
    want = rt.load(tmp_path / "fp32").last_logits(prompts)
    got = rt.load(tmp_path / "head8").last_logits(prompts)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_a_converted_head_keeps_no_dead_float_weights(tmp_path):
    """A Gemm(transB) head on a GGUF Q8_0 table (a tied embedding) converted to int4 holds only the re-encoded 8-bit
    weight, not the float table as well."""
    rng = np.random.default_rng(4)
    q8 = rng.integers(-127, 128, (96, K // 32, 32))
    q8[:, :, 0] = 127
    table = (rng.uniform(0.001, 0.01, (96, K // 32, 1)) * q8).reshape(96, K).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "E"], ["y"], transB=1, name="head")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 96])],
                              [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "head.onnx"))
    quantize.convert(tmp_path / "head.onnx", tmp_path / "int4.onnx", "int4")
    inits = onnx.load(str(tmp_path / "int4.onnx")).graph.initializer
    assert not [t.name for t in inits if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 96 * K]
    assert (tmp_path / "int4.onnx").stat().st_size < table.nbytes / 2


def test_grid_and_head_bits_are_refused_where_they_would_be_ignored(tmp_path):
    from conftest import run_cli

    code, _, err = run_cli("adainfer-export", "-o", str(tmp_path / "b"), "--precision", "int8-weight", "--head-bits", "8")
    assert code == 2 and "--head-bits applies to --precision int4 or fp32 only (got int8-weight)" in err
    code, _, err = run_cli("adainfer-export", "-o", str(tmp_path / "b"), "--grid", "rtn")
    assert code == 2 and "--grid rtn applies to --precision int4 only (got fp32)" in err
    assert not (tmp_path / "b").exists()
