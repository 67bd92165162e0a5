"""An 8-bit LM head read at 4 bits, its best candidates re-scored at 8: about the 4-bit head's cost, the 8-bit choice.

An LM head is read in full at every token and at every exit (SmolLM2: 49,152 x 576, 28 MB at 8 bits
against ~60 MB for all 30 int4 blocks). Rounded to 4 bits it is read faster but loses top-1 agreement
with float32 (SmolLM2: 0.84, docs/quantization.md). Which tokens are *near* the top survives 4 bits;
their order does not. So `refine_heads` rewrites the head's 8-bit `MatMulNBits` as

    coarse = MatMulNBits(x, 4-bit table)                  # every logit, 4-bit weights
    top    = TopK(coarse, R)                               # the R candidates
    rows   = GatherBlockQuantized(8-bit table, top)        # their 8-bit rows, dequantized
    exact  = rows @ x                                      # float activations, 8-bit weights
    logits = ScatterElements(Min(coarse, min(exact)), top, exact)

The R re-scored logits are the float32 head's on the 8-bit weights (the 8-bit node rounds x to int8 per
block; this does not); every other logit keeps its 4-bit value, capped at the lowest re-scored one, so
the argmax is always a re-scored token. What changes is the tail of the distribution (4-bit logits in
the softmax's denominator): perplexity, not the greedy choice. Measured on SmolLM2 (docs/quantization.md):
the head 1.89 -> 1.10 ms per decoded token, fp32 blocks with it agree with float32 at 1.000 (8-bit head
0.989), perplexity x1.008 with R = 64, x1.0005 for int4 with R = 256.

The 8-bit table is stored in the embedding's `GatherBlockQuantized` layout, (rows, hidden) with scales
(rows, hidden / block), so where the embedding is that table (int4 from a GGUF: the same Q8_0 bytes)
the bundle stores it once (`shared_weights.py`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from .gguf_grid import pack_4_bits
from .graph_files import node_attrs, replace_body

#: MatMulNBits' default zero point at 8 bits (unsigned storage of symmetric integers)
ZERO_8 = 128


def eight_bit_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's 8-bit MatMulNBits nodes without zero points (in a head graph: its LM head)."""
    return [n for n in model.graph.node if n.op_type == "MatMulNBits" and node_attrs(n).get("bits") == 8
            and len([i for i in n.input if i]) == 3]


def round_to_4_bits(table: np.ndarray, scales: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed 4-bit MatMulNBits data (N, K/block, block/2), scales (N * K/block,)): the 8-bit table (N, K)
    with its scales (N, K/block) dequantized, then rounded to nearest on a symmetric 4-bit grid per block
    (codes 0..15 around the default zero point 8: step = max |w| / 7)."""
    n, k = table.shape
    w = (table.astype(np.float32) - ZERO_8).reshape(n, k // block, block) * scales[:, :, None]
    step = np.abs(w).max(axis=2) / 7
    safe = np.where(step > 0, step, 1.0)
    codes = (np.clip(np.rint(w / safe[:, :, None]), -8, 7) + 8).astype(np.uint8)
    return pack_4_bits(codes), step.astype(np.float32).reshape(-1)


def _reduce_min_last(x: str, out: str, name: str, axes: str, opset: int) -> onnx.NodeProto:
    """ReduceMin over the last axis, keeping it: axes became an input in opset 18."""
    if opset >= 18:
        return helper.make_node("ReduceMin", [x, axes], [out], name=name)
    return helper.make_node("ReduceMin", [x], [out], name=name, axes=[-1])


def refine_heads(model: onnx.ModelProto, candidates: int) -> onnx.ModelProto:
    """Rewrite the 8-bit LM head of the head graph `model` in place as described above."""
    heads = eight_bit_nodes(model)
    if len(heads) != 1:
        raise ExportError(f"--head-refine needs an 8-bit LM head (--head-bits 8); {model.graph.name or 'the head graph'} "
                          f"has {len(heads)} 8-bit MatMulNBits")
    vocab = node_attrs(heads[0])["N"]
    if not 1 <= candidates <= vocab:
        raise ExportError(f"--head-refine takes 1..{vocab} candidates (the vocabulary), got {candidates}")
    (node,) = heads
    inits = {t.name: t for t in model.graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    attrs = node_attrs(node)
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    x, b_name, s_name = node.input[:3]
    table = numpy_helper.to_array(inits[b_name]).reshape(n, k)
    scales = numpy_helper.to_array(inits[s_name]).reshape(n, k // block)
    packed, steps = round_to_4_bits(table, scales, block)
    p, out = node.name, node.output[0]
    new_inits = [numpy_helper.from_array(packed, f"{p}_R4_B"), numpy_helper.from_array(steps, f"{p}_R4_scales"),
                 numpy_helper.from_array(table, f"{p}_R8_table"), numpy_helper.from_array(scales, f"{p}_R8_scales"),
                 numpy_helper.from_array(np.array([candidates], dtype=np.int64), f"{p}_R_count"),
                 numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}_R_last")]
    refined = [
        helper.make_node("MatMulNBits", [x, f"{p}_R4_B", f"{p}_R4_scales"], [f"{out}_coarse"], name=f"{p}_R4",
                         domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                         accuracy_level=attrs.get("accuracy_level", 0)),
        helper.make_node("TopK", [f"{out}_coarse", f"{p}_R_count"], [f"{out}_top_values", f"{out}_top"],
                         name=f"{p}_R_top", axis=-1),
        helper.make_node("GatherBlockQuantized", [f"{p}_R8_table", f"{out}_top", f"{p}_R8_scales"],
                         [f"{out}_rows"], name=f"{p}_R8_rows", domain="com.microsoft", bits=8, block_size=block,
                         gather_axis=0, quantize_axis=1),
        helper.make_node("Unsqueeze", [x, f"{p}_R_last"], [f"{out}_column"], name=f"{p}_R_column"),
        helper.make_node("MatMul", [f"{out}_rows", f"{out}_column"], [f"{out}_exact_column"], name=f"{p}_R8"),
        helper.make_node("Squeeze", [f"{out}_exact_column", f"{p}_R_last"], [f"{out}_exact"], name=f"{p}_R8_exact"),
        _reduce_min_last(f"{out}_exact", f"{out}_floor", f"{p}_R_floor", f"{p}_R_last", opset),
        helper.make_node("Min", [f"{out}_coarse", f"{out}_floor"], [f"{out}_tail"], name=f"{p}_R_tail"),
        helper.make_node("ScatterElements", [f"{out}_tail", f"{out}_top", f"{out}_exact"], [out],
                         name=f"{p}_R_scatter", axis=-1),
    ]
    nodes = [m for other in model.graph.node for m in (refined if other == node else [other])]  # == compares contents
    return replace_body(model, nodes, new_inits, {b_name, s_name})
