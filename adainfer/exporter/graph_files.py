"""Writing and rewriting one ONNX graph of a bundle: inline weights, or ONNX external data past a size.

Protobuf cannot hold more than 2 GiB, so graphs whose weights exceed the threshold keep them
in `<file>.data` beside the graph (onnx/onnx#4394). Every writer of bundle graphs goes here.
"""

from __future__ import annotations

from pathlib import Path

import onnx


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def save_graph(model: onnx.ModelProto, path: Path, weight_bytes: int, threshold: int) -> None:
    """Save `model` at `path`, with external data when `weight_bytes` exceeds `threshold`; then check it."""
    path = Path(path)
    if weight_bytes > threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def replace_body(model: onnx.ModelProto, nodes: list, new_initializers: list, replaced: set) -> onnx.ModelProto:
    """Give `model` the node list `nodes` and add `new_initializers`; the initializers named in `replaced`
    go unless a node still reads them (a rewrite that swaps weights for new ones keeps no dead copy)."""
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name not in replaced or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_initializers)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model
