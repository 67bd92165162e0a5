"""Which ONNX nodes must stay float32 under fp16 / int8, and which TensorRT layers they became.

The exporter computes norms and softmax in float32 (squares overflow in fp16, pytorch#133085;
TensorRT#2781 for LayerNorm), but a weakly typed TensorRT build may still pick fp16 kernels
for them. `fp32_nodes` finds those nodes from the graph's structure, not from names:

- RMSNorm / LayerNorm written as primitives: a ReduceMean of a square (Pow(x, 2) or Mul(x, x))
  and the chain that follows it (Add eps, Sqrt, Div or Reciprocal, the Mul or Div that scales x),
  plus for LayerNorm the centering (ReduceMean and Sub) that feeds the square;
- LayerNormalization, RMSNormalization (opset 23) and SimplifiedLayerNormalization nodes;
- Softmax / LogSoftmax, and in the exit head the TopK / Gather / Sub that turn the softmax
  into top-1 probability and gap (thresholds compare those values to 1e-3);
- in the exit decider (decider.py), every node adainfer added: the fold of the linear
  classifier and the cos_prev / norm_ratio computation (named `adainfer_decider/...`), since
  their `score` is compared with a threshold.

TensorRT's ONNX parser names a layer after its node (duplicates get a numeric suffix) and
records `[ONNX Layer: <node name>]` in the layer's metadata (onnx-tensorrt's processMetadata;
`ILayer.metadata` in TensorRT 10; several entries separated by \\x1f after fusion).
`layer_nodes` maps a layer back to its nodes through the metadata, then the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

SQUARE_OPS = ("Pow", "Mul")
NORM_CHAIN_OPS = ("Add", "Sqrt", "Div", "Reciprocal", "Mul")
NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization")
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
AFTER_SOFTMAX_OPS = ("TopK", "Gather", "Sub", "Slice", "Squeeze")
MULTI_TYPED_OPS = ("TopK",)
DECIDER_PREFIX = "adainfer_decider/"  # nodes of the exit decider's fold and features (decider.py)
_METADATA = re.compile(r"\[ONNX Layer: ([^\]|]+?)\s*(?:\|[^\]]*)?\]")


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def nodes_from_onnx(path: Path) -> list[Node]:
    """The nodes of an ONNX file (needs the `onnx` package; weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [Node(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def fp32_nodes(nodes: Sequence[Node]) -> list[str]:
    """Names of the nodes to hold in float32, in graph order."""
    producer = {out: n for n in nodes for out in n.outputs}
    consumers: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    chosen: set[str] = set()

    def only_consumer(node: Node):
        users = [u for o in node.outputs for u in consumers.get(o, [])]
        return users[0] if len(users) == 1 else None

    for node in nodes:
        if node.name.startswith(DECIDER_PREFIX):
            chosen.add(node.name)
        elif node.op_type in NORM_OPS:
            chosen.add(node.name)
        elif node.op_type in SOFTMAX_OPS:
            chosen.add(node.name)
            frontier = [node]
            while frontier:  # exit-head tail: top-1 probability and gap (not TopK's indices)
                current = frontier.pop()
                outs = current.outputs[:1] if current.op_type == "TopK" else current.outputs
                for out in outs:
                    for user in consumers.get(out, []):
                        if user.op_type in AFTER_SOFTMAX_OPS and user.name not in chosen:
                            chosen.add(user.name)
                            frontier.append(user)
        elif node.op_type == "ReduceMean" and node.inputs:
            square = producer.get(node.inputs[0])
            if square is None or not _is_square(square):
                continue
            x = square.inputs[0]
            chosen.update({node.name, square.name})
            centre = producer.get(x)  # LayerNorm: x = Sub(input, ReduceMean(input))
            if centre is not None and centre.op_type == "Sub":
                mean = producer.get(centre.inputs[1]) if len(centre.inputs) > 1 else None
                if mean is not None and mean.op_type == "ReduceMean":
                    chosen.update({centre.name, mean.name})
            step = node
            for _ in range(6):  # Add(eps) -> Sqrt -> Div/Reciprocal -> Mul/Div(x, .)
                step = only_consumer(step)
                if step is None or step.op_type not in NORM_CHAIN_OPS:
                    break
                chosen.add(step.name)
                if step.op_type in ("Mul", "Div") and x in step.inputs:
                    break
    return [n.name for n in nodes if n.name in chosen]


def _is_square(node: Node) -> bool:
    if node.op_type == "Mul":
        return len(node.inputs) == 2 and node.inputs[0] == node.inputs[1]
    return node.op_type == "Pow"  # exponent 2 in every exporter we know; checked by the tests on real graphs


def metadata_nodes(metadata: str) -> list[str]:
    """ONNX node names recorded in a TensorRT layer's metadata string."""
    return [m.strip() for m in _METADATA.findall(metadata or "")]


def layer_nodes(layer_name: str, metadata: str, node_names: Iterable[str]) -> set[str]:
    """The ONNX nodes a TensorRT network layer came from: from its metadata when the parser
    wrote it, else from its name (the node name, or the node name plus the parser's `_N` suffix
    for extra layers, taking the longest node name that fits)."""
    found = set(metadata_nodes(metadata))
    if found:
        return found
    names = set(node_names)
    if layer_name in names:
        return {layer_name}
    base = re.sub(r"_\d+$", "", layer_name)
    return {base} if base in names and base != layer_name else set()


def trtexec_layer_precisions(layers: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """`--layerPrecisions` and `--layerOutputTypes` values pinning these (name, op_type) layers to
    fp32. trtexec matches exact layer names (`*` only as the default for all others); TopK is left
    out of the output types (its second output is integer indices)."""
    usable = [(n, op) for n, op in layers if "," not in n and ":" not in n]
    return (",".join(f"{n}:fp32" for n, _ in usable),
            ",".join(f"{n}:fp32" for n, op in usable if op not in MULTI_TYPED_OPS))
