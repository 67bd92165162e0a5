"""Weights that are already 4- or 8-bit (a GGUF source) re-encoded exactly as `MatMulNBits`, not rounded again.

A GGUF model's float32 weights are dequantized blocks: Q4_1 stores, per block of 32 along the
input dimension K, `w = d * q + m` (q in 0..15), Q8_0 stores `w = d * q` (q in -127..127).
Rounding such weights to a new 4-bit grid (round-to-nearest, as onnxruntime-genai's int4 does)
adds a second quantization error: on SmolLM2-135M-Instruct (Q4_1) top-1 agreement with the
float32 model fell to 0.70 (blocks only) and 0.63 (with the LM head). Re-encoded exactly instead:

- Q4_1 -> `MatMulNBits(bits=4, scales=d)` on q - 8 (the symmetric default zero point 8: centred
  integers keep the int8 compute's rounding of x small) plus the rest as a small float term,
  `blocksum(x) @ (m + 8 d)` (x summed over each block of 32 inputs; K/32 x N);
- Q8_0 -> `MatMulNBits(bits=8)` with the block scales d (zero point 128, the symmetric default);
  a Q8_0 embedding table (blocks along the hidden axis) -> `GatherBlockQuantized(bits=8)`.

A matrix is re-encoded only when every block lies on the grid (residual < `GRID_TOLERANCE` of a
step) and the requested block size is the grid's (32); anything else is left to the quantizer.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_files import replace_body

GGUF_BLOCK = 32
#: largest distance from the grid, in grid steps, still counted as on it (float32 rounding of d and m)
GRID_TOLERANCE = 1e-3


def q4_1_grid(w: np.ndarray, block: int = GGUF_BLOCK) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(q (K, N) uint8 in 0..15, d (K/block, N), m (K/block, N)) when `w` (K, N) is Q4_1 along K, else None."""
    k, n = w.shape
    if k % block:
        return None
    blocks = w.reshape(k // block, block, n).astype(np.float64)
    low, high = blocks.min(1), blocks.max(1)
    step = (high - low) / 15
    safe = np.where(step > 0, step, 1.0)
    q = (blocks - low[:, None]) / safe[:, None]
    if np.max(np.abs(q - np.rint(q))) > GRID_TOLERANCE:
        return None
    return np.rint(q).astype(np.uint8).reshape(k, n), step.astype(np.float32), low.astype(np.float32)


def q8_0_grid(w: np.ndarray, block: int = GGUF_BLOCK) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(q (K, N) int8 in -127..127, d (K/block, N)) when `w` (K, N) is Q8_0 along K, else None."""
    k, n = w.shape
    if k % block:
        return None
    blocks = w.reshape(k // block, block, n).astype(np.float64)
    step = np.abs(blocks).max(1) / 127
    safe = np.where(step > 0, step, 1.0)
    q = blocks / safe[:, None]
    if np.max(np.abs(q - np.rint(q))) > GRID_TOLERANCE:
        return None
    return np.rint(q).astype(np.int8).reshape(k, n), step.astype(np.float32)


def grid_kind(w: np.ndarray) -> Optional[str]:
    """"q4_1", "q8_0" or None: the GGUF grid `w` (K, N) lies on along K (what `encode_exact` would do with it)."""
    if w.ndim != 2:
        return None
    if q4_1_grid(w) is not None:
        return "q4_1"
    return "q8_0" if q8_0_grid(w) is not None else None


def pack_4_bits(codes: np.ndarray) -> np.ndarray:
    """MatMulNBits' 4-bit storage of `codes` (..., block) in 0..15: two to a byte along the last axis, low nibble first."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _nbits_node(name: str, x: str, out: str, q: np.ndarray, scales: np.ndarray, bits: int, block: int,
                accuracy_level: int, zero_points: Optional[np.ndarray]) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A MatMulNBits node for stored integers q (K, N) (already offset to unsigned) and scales (K/block, N)."""
    k, n = q.shape
    per_block = q.T.reshape(n, k // block, block)
    if bits == 4:
        data = pack_4_bits(per_block)
    else:
        data = per_block.astype(np.uint8)
    inits = [numpy_helper.from_array(data, f"{name}_B"), numpy_helper.from_array(scales.T.reshape(-1).copy(), f"{name}_scales")]
    inputs = [x, inits[0].name, inits[1].name]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, f"{name}_zero_points"))
        inputs.append(inits[-1].name)
    node = helper.make_node("MatMulNBits", inputs, [out], name=name, domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    return node, inits


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor ONNX shape inference knows (the graphs' inputs and what follows from them)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info, *graph.output]
            if v.type.tensor_type.HasField("shape")}


#: suffix of the float MatMuls that add the Q4_1 block minima: they must stay float (never quantized again)
OFFSET_SUFFIX = "_gguf_offset"


def encode_exact(model: onnx.ModelProto, nodes: list[onnx.NodeProto], block_size: int, accuracy_level: int) -> onnx.ModelProto:
    """Replace every MatMul in `nodes` whose constant weight lies on a Q4_1 or Q8_0 grid; the others stay.
    The minima MatMuls it adds are named `*{OFFSET_SUFFIX}`: later quantization must leave them float."""
    if block_size != GGUF_BLOCK:
        return model
    inits = {t.name: t for t in model.graph.initializer}
    targets = {n.name for n in nodes}
    ranks = _ranks(model)
    new_nodes, new_inits, replaced = [], [], set()
    block_sums: dict[str, str] = {}  # input -> its per-block sums, shared by the MatMuls that read it
    for node in model.graph.node:
        if node.op_type == "Gather" and node.name in targets and node.input[0] in inits:
            table = numpy_helper.to_array(inits[node.input[0]])
            q8 = q8_0_grid(table.T) if table.ndim == 2 else None
            if q8 is None:
                new_nodes.append(node)
                continue
            q, d = q8
            replaced.add(node.input[0])
            data = numpy_helper.from_array((q.T.astype(np.int16) + 128).astype(np.uint8), f"{node.name}_Q8")
            scales = numpy_helper.from_array(d.T.copy(), f"{node.name}_scales")
            new_inits += [data, scales]
            new_nodes.append(helper.make_node("GatherBlockQuantized", [data.name, node.input[1], scales.name],
                                              list(node.output), name=f"{node.name}_Q8", domain="com.microsoft",
                                              bits=8, block_size=GGUF_BLOCK, gather_axis=0, quantize_axis=1))
            continue
        weight = inits.get(node.input[1]) if node.name in targets else None
        w = numpy_helper.to_array(weight) if weight is not None else None
        q4 = q4_1_grid(w) if w is not None else None
        q8 = q8_0_grid(w) if w is not None and q4 is None else None
        if q4 is None and q8 is None:
            new_nodes.append(node)
            continue
        x, out = node.input[0], node.output[0]
        replaced.add(weight.name)
        if q8 is not None:
            q, d = q8
            nbits, tensors = _nbits_node(f"{node.name}_Q8", x, out, (q.astype(np.int16) + 128).astype(np.uint8), d, 8,
                                         GGUF_BLOCK, accuracy_level, None)
            new_nodes.append(nbits)
            new_inits += tensors
            continue
        q, d, m = q4
        k, n = q.shape
        nbits, tensors = _nbits_node(f"{node.name}_Q4", x, f"{out}_q4", q, d, 4, GGUF_BLOCK, accuracy_level, None)
        m = m + 8 * d  # d * q + m = d * (q - 8) + (m + 8 d); MatMulNBits subtracts its default zero point 8
        new_inits += tensors
        if x not in block_sums:
            shape, axis = f"{node.name}_block_shape", f"{node.name}_block_axis"
            keep = [0] * (ranks[x] - 1)  # Reshape's 0 copies the leading dimensions
            new_inits += [numpy_helper.from_array(np.array(keep + [k // GGUF_BLOCK, GGUF_BLOCK], dtype=np.int64), shape),
                          numpy_helper.from_array(np.array([-1], dtype=np.int64), axis)]
            block_sums[x] = f"{x}_block_sums"
            new_nodes += [helper.make_node("Reshape", [x, shape], [f"{x}_blocks"], name=f"{node.name}_blocks"),
                          helper.make_node("ReduceSum", [f"{x}_blocks", axis], [block_sums[x]], keepdims=0,
                                           name=f"{node.name}_block_sums")]
        new_inits.append(numpy_helper.from_array(m, f"{node.name}_mins"))
        new_nodes += [nbits,
                      helper.make_node("MatMul", [block_sums[x], f"{node.name}_mins"], [f"{out}_offset"],
                                       name=f"{node.name}{OFFSET_SUFFIX}"),
                      helper.make_node("Add", [f"{out}_q4", f"{out}_offset"], [out], name=f"{node.name}_add_offset")]
    if not replaced:
        return model
    replace_body(model, new_nodes, new_inits, replaced)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model
