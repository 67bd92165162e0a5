"""A residual Add followed by the next block's RMSNorm, made one SkipSimplifiedLayerNormalization.

A block graph starts with its input RMSNorm and ends with its residual Add; in a merged graph (a span, the
full step) one block's Add feeds the next block's norm, and the Add's sum is read again by that block's own
residual. ONNX Runtime fuses the norm (Pow, ReduceMean, Add, Sqrt, Div, Mul) into SimplifiedLayerNormalization
but not the Add into it while the sum has another reader; SkipSimplifiedLayerNormalization writes that sum as
its fourth output (as onnxruntime-genai's builder emits it). One node fewer per block: ~0.1 ms of a ~5 ms int4
SmolLM2 token. Used on the twins the Q4_1 kernel runs (q4_1_twins.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_files import node_attrs

MS_DOMAIN = "com.microsoft"


def fuse_skip_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with each `Add(a, b)` -> RMSNorm(sum) * weight made `SkipSimplifiedLayerNormalization(a, b, weight)`
    (the sum its fourth output, for its other readers); how many it fused."""
    nodes = list(model.graph.node)
    readers: dict = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    constants = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}

    def value(name: str):
        return numpy_helper.to_array(constants[name]) if name in constants else None

    def sole(node, op: str):
        """The one node reading `node`'s output, if it is an `op` (and the output is not a graph output)."""
        found = readers.get(node.output[0], [])
        return found[0] if len(found) == 1 and found[0].op_type == op and node.output[0] not in outputs else None

    replaced, dropped = {}, set()  # by identity: names are not required to be unique
    for add in nodes:
        if add.op_type != "Add" or len(add.input) != 2 or any(i in constants for i in add.input):
            continue
        total = add.output[0]
        pow_ = next((n for n in readers.get(total, []) if n.op_type == "Pow" and n.input[0] == total), None)
        if pow_ is None or value(pow_.input[1]) is None or not np.all(value(pow_.input[1]) == 2):
            continue
        mean = sole(pow_, "ReduceMean")
        if mean is None or node_attrs(mean).get("axes") != [-1]:
            continue
        plus_eps = sole(mean, "Add")
        eps = value(plus_eps.input[1]) if plus_eps is not None else None
        sqrt = sole(plus_eps, "Sqrt") if eps is not None and eps.size == 1 else None
        div = sole(sqrt, "Div") if sqrt is not None else None
        if div is None or list(div.input) != [total, sqrt.output[0]]:
            continue
        scale = sole(div, "Mul")
        weight = next((i for i in scale.input if i != div.output[0]), None) if scale is not None else None
        if weight is None or weight not in constants or set(scale.input) != {div.output[0], weight}:
            continue
        replaced[id(add)] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [*add.input, weight], [scale.output[0], "", "", total],
            name=f"{add.name}_skip_norm", domain=MS_DOMAIN, epsilon=float(eps.reshape(-1)[0]))
        dropped |= {id(pow_), id(mean), id(plus_eps), id(sqrt), id(div), id(scale)}
    # the fused node takes the Add's place: its inputs come before it, every reader of its outputs after
    kept = [replaced.get(id(node), node) for node in nodes if id(node) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if replaced and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, len(replaced)
