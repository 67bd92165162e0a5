"""The residual Add and the RMSNorm after it become one SkipSimplifiedLayerNormalization (exporter/skip_norms.py):
same values, the sum still there for its other readers."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from adainfer.exporter.skip_norms import fuse_skip_norms


def residual_then_norm(eps: float = 1e-5) -> onnx.ModelProto:
    """h = a + b; y = h / sqrt(mean(h^2) + eps) * w (the exporter's block norm); z = h + y (another reader of h)."""
    f = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "s", 8])
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Add", ["a", "b"], ["h"], name="residual"),
        helper.make_node("Pow", ["h", "two"], ["sq"], name="sq"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], name="ms", axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="ms_eps"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="rms"),
        helper.make_node("Div", ["h", "rms"], ["scaled"], name="scaled"),
        helper.make_node("Mul", ["scaled", "w"], ["y"], name="norm"),
        helper.make_node("Add", ["h", "y"], ["z"], name="reader"),
    ]
    inits = [numpy_helper.from_array(np.array([2.0], np.float32), "two"),
             numpy_helper.from_array(np.array([eps], np.float32), "eps"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [f("a"), f("b")], [f("y"), f("z")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, feeds: dict) -> list:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ONNX Runtime's own fusions off
    return ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)


def test_add_and_norm_become_one_node_with_the_same_values():
    model = residual_then_norm(eps=1e-3)
    fused, count = fuse_skip_norms(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 1
    assert [n.op_type for n in fused.graph.node] == ["SkipSimplifiedLayerNormalization", "Add"]
    node = fused.graph.node[0]
    assert list(node.output) == ["y", "", "", "h"]
    assert abs(helper.get_attribute_value(node.attribute[0]) - 1e-3) < 1e-9
    rng = np.random.default_rng(1)
    feeds = {k: rng.normal(size=(1, 3, 8)).astype(np.float32) for k in ("a", "b")}
    for want, got in zip(run(model, feeds), run(fused, feeds)):
        assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())


def test_a_norm_that_reads_something_else_is_left_alone():
    """The Div divides another tensor by the sum's rms: not the norm of the sum."""
    model = residual_then_norm()
    model.graph.node[5].input[0] = "a"
    fused, count = fuse_skip_norms(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 0 and len(fused.graph.node) == 8
