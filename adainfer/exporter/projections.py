"""MatMuls that read the same input (q/k/v, gate/up, a kv fill's k/v) run as one MatMul and a Split.

Why: in a one-token decode step every projection is a small matrix-vector product; one MatMul on the
weights concatenated along N does the same multiply-adds in one kernel call, as onnxruntime-genai's
builder writes `qkv_proj` (SmolLM2 float32 full step, q/k/v and gate/up fused: 18.38 -> 17.53 ms a
step in plain sessions; docs/bench/speed-profile.md). Outputs are the unfused graph's bit for bit:
each output column is the same dot product.

Two forms of the concatenated weights:
- `fuse_projections`: one new initializer (the quantizers need the fused weights as one constant);
- `fuse_projections_at_load`: a Concat of the existing initializers, which ONNX Runtime's constant
  folding turns into one tensor when a session loads the graph. The merged graphs (spans, the full
  step, merged kv fills) use it: they reference the blocks' weight files, and a new initializer would
  add those bytes to the bundle a second time.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_files import replace_body

#: weight types fused at load (a Concat works for any); `fuse_projections` takes float32 only (its quantizers)
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def projection_groups(model: onnx.ModelProto, same_kind: Optional[Callable] = None,
                      types=(onnx.TensorProto.FLOAT,)) -> dict[str, list[onnx.NodeProto]]:
    """Name of each group's first MatMul -> the MatMuls (two or more) with a constant 2-D B of one of `types`,
    the same K, and the same input. `same_kind(w)` (optional, reads the weights) gives a key per weight; only
    weights with equal keys are grouped (e.g. the GGUF grid a weight lies on)."""
    inits = {t.name: t for t in model.graph.initializer}
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is not None and weight.data_type in types and len(weight.dims) == 2:
            by_input.setdefault(node.input[0], []).append(node)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for nodes in by_input.values():
        keys = [same_kind(numpy_helper.to_array(inits[n.input[1]])) if same_kind else None for n in nodes]
        for key in dict.fromkeys(keys):
            members = [n for n, k in zip(nodes, keys) if k == key]
            if len(members) > 1 and len({inits[n.input[1]].dims[0] for n in members}) == 1:
                groups[members[0].name] = members
    return groups


def _fused(model: onnx.ModelProto, groups: dict, weights: Callable) -> onnx.ModelProto:
    """`model` with each group replaced by MatMul(input, weights(name, members)) -> Split into the members' outputs.
    `weights` returns the fused B's name, the nodes and initializers that make it."""
    inits = {t.name: t for t in model.graph.initializer}
    dropped = {n.name for members in groups.values() for n in members}
    replaced = {n.input[1] for members in groups.values() for n in members}
    new_nodes, new_inits = [], []
    for node in model.graph.node:
        if node.name in groups:
            members = groups[node.name]
            name = f"{node.name}_fused"
            weight, made_by, made = weights(name, members)
            widths = [inits[n.input[1]].dims[1] for n in members]
            new_inits += [*made, numpy_helper.from_array(np.array(widths, np.int64), f"{name}_split")]
            new_nodes += [*made_by,
                          helper.make_node("MatMul", [node.input[0], weight], [f"{name}_out"], name=name),
                          helper.make_node("Split", [f"{name}_out", f"{name}_split"], [n.output[0] for n in members],
                                           axis=-1, name=f"{name}_split")]
        elif node.name not in dropped:
            new_nodes.append(node)
    return replace_body(model, new_nodes, new_inits, replaced)


def fuse_projections(model: onnx.ModelProto, same_kind: Optional[Callable] = None) -> onnx.ModelProto:
    """Float32 MatMuls with a constant 2-D B that read the same input -> one MatMul on the weights concatenated
    along N (a new initializer; the graph's weights must be loaded), then a Split back into the original outputs."""
    groups = projection_groups(model, same_kind)
    if not groups:
        return model
    inits = {t.name: t for t in model.graph.initializer}

    def concatenated(name: str, members: list) -> tuple[str, list, list]:
        joined = np.concatenate([numpy_helper.to_array(inits[n.input[1]]) for n in members], axis=1)
        return f"{name}_weight", [], [numpy_helper.from_array(joined, f"{name}_weight")]

    return _fused(model, groups, concatenated)


def fuse_projections_at_load(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float MatMuls with a constant 2-D B that read the same input -> Concat of their weights (folded by ONNX
    Runtime when the session loads), one MatMul, a Split. Reads no weight data: works on a graph loaded without
    its external data, and the saved graph still points at the same bytes."""
    groups = projection_groups(model, types=FLOAT_TYPES)
    if not groups:
        return model

    def concat_node(name: str, members: list) -> tuple[str, list, list]:
        node = helper.make_node("Concat", [n.input[1] for n in members], [f"{name}_weight"], axis=1,
                                name=f"{name}_weight")
        return f"{name}_weight", [node], []

    return _fused(model, groups, concat_node)
