"""The precision of a bundle's TensorRT engines, read from its graphs.

Engines are strongly typed networks (build.py): TensorRT keeps every tensor's ONNX type, so the
precision is decided at export (fp32, or fp16 with norms, rotary and softmax kept float32 by the
exporter; int8 through explicit QuantizeLinear / DequantizeLinear nodes), not by builder flags or
per-layer pinning (which TensorRT 11 no longer has).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DECIDER_PREFIX = "adainfer_decider/"  # nodes of the exit decider's fold and features (decider.py)


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


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
ONNXRUNTIME_ONLY = ("int8-weight", "int8-dynamic", "int4")  # MatMulNBits / MatMulInteger: contrib ops TensorRT cannot parse


def engine_precision(bundle_root: Path, manifest, requested=None) -> str:
    """The precision of a bundle's engines, which strongly typed networks take from its graphs:
    "fp32" or "fp16" as exported, "int8" when the blocks carry explicit Q/DQ nodes. `requested`
    (build-engines --precision) must agree; anything else is refused in one line."""
    from .errors import EngineError

    if manifest.num_layers == 0:
        return requested or "fp32"
    spec = manifest.graphs[manifest.block_name(0)]
    if spec.precision in ONNXRUNTIME_ONLY:
        raise EngineError(f"this bundle's blocks are {spec.precision} (ONNX Runtime contrib operators TensorRT cannot "
                          f"parse): build engines from an fp32 or fp16 export (adainfer-export --precision fp16)")
    has_qdq = any(n.op_type in QDQ_OPS for n in nodes_from_onnx(Path(bundle_root) / spec.file))
    found = "int8" if has_qdq else spec.precision
    if found not in ("fp32", "fp16", "int8"):
        raise EngineError(f"this bundle's blocks are {found}: TensorRT engines need fp32, fp16 or Q/DQ int8 graphs")
    if requested is not None and requested != found:
        how = ("int8 engines need graphs with explicit QuantizeLinear/DequantizeLinear nodes"
               if requested == "int8" else f"export the bundle with --precision {requested}")
        raise EngineError(f"engines take their precision from the bundle's graphs (strongly typed networks): this "
                          f"bundle is {found}, --precision {requested} asked for another ({how})")
    return found
