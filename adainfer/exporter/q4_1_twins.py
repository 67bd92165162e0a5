"""Twins of the merged graphs whose exact Q4_1 groups are each one fused kernel node (runtime/q4_1_kernel.py).

A Q4_1 group, as `gguf_grid.encode_exact` writes it, is a MatMulNBits on q - 8 (`*_Q4`) whose output an Add
(`*_add_offset`) sums with `blocksum(x) @ (m + 8 d)` (a MatMul `*_gguf_offset` on the input's block sums). The twin
replaces the three nodes by one `adainfer.MatMulQ4_1(x, codes, scales, m + 8 d)` on the same initializers (so it
adds no weight bytes: it points into the same data files) and drops the block sums nothing else reads. A fused
gate and up projection whose only reader is the MLP's SwiGLU (Split in halves, Sigmoid, Mul, Mul) takes it in too
(`swiglu=1`): ~25 us of small nodes per layer on SmolLM2, where a decode token is ~5 ms. The twin's residual Adds
and the norms after them are also made one node each (`skip_norms.py`), and its attention drops the bias that masks
left padding (a merged graph only runs unpadded batches: `drop_padding_bias`); a refined LM head's re-scoring tail
is one `adainfer.HeadRefine` node (`fuse_head_refine`). Written
after the merged graphs are final (their digest is in the twin's name), listed in the manifest's attachments (like
the merged graphs, outside the bundle's digest: a calibrated policy stays valid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import onnx
from onnx import helper, numpy_helper

from ..manifest import Manifest
from ..runtime.q4_1_kernel import DOMAIN, OP, REFINE_OP, twin_file, twin_key
from .graph_files import node_attrs
from .skip_norms import fuse_skip_norms

ATTENTION_BIAS = 10  # GroupQueryAttention's input (rotary_fold.py lists them)


def fuse_q4_1(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with every Q4_1 group replaced by one fused node; how many groups it had."""
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    fused, dropped = {}, set()  # by identity, as the passes below
    for node in nodes:
        if not node.name.endswith("_add_offset") or node.op_type != "Add":
            continue
        nbits, offset = producer.get(node.input[0]), producer.get(node.input[1])
        if nbits is None or offset is None or nbits.op_type != "MatMulNBits" or offset.op_type != "MatMul":
            continue
        attrs = node_attrs(nbits)
        if len(nbits.input) != 3 or attrs.get("bits") != 4 or attrs.get("block_size") != 32:
            continue
        fused[id(node)] = helper.make_node(OP, [*nbits.input[:3], offset.input[1]], [node.output[0]],
                                            name=f"{nbits.name}_fused", domain=DOMAIN, K=attrs["K"], N=attrs["N"])
        dropped |= {id(nbits), id(offset)}
    kept = _drop_unread(_fuse_swiglu([fused.get(id(n), n) for n in nodes if id(n) not in dropped], model.graph),
                        model.graph)  # the block sums (and their reshapes) nothing reads any more
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if fused and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, len(fused)


class _Readers:
    """The nodes reading each value of a node list; a graph output is read by the caller too."""

    def __init__(self, nodes: list, graph: onnx.GraphProto):
        self.by_name: dict = {}
        for node in nodes:
            for name in node.input:
                self.by_name.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}

    def only(self, name: str, count: int = 1) -> list:
        """`name`'s readers where it has exactly `count` and is no graph output, else []."""
        found = self.by_name.get(name, [])
        return found if len(found) == count and name not in self.outputs else []

    def unread(self, name: str) -> bool:
        return name not in self.by_name and name not in self.outputs


def _fuse_swiglu(nodes: list, graph: onnx.GraphProto) -> list:
    """`nodes` with each fused node whose output only the SwiGLU pattern reads, `silu(gate) * up` with
    `gate, up = Split(y)` in equal halves of the last axis, made one node with `swiglu=1` writing the product."""
    reads = _Readers(nodes, graph)
    only = reads.only
    constants = {t.name: t for t in graph.initializer}

    replaced, dropped = {}, set()  # by identity: names are not required to be unique
    for node in nodes:
        if node.op_type != OP or node.domain != DOMAIN:
            continue
        attrs = node_attrs(node)
        split = only(node.output[0])
        if attrs.get("swiglu") or attrs["N"] % 2 or not split or split[0].op_type != "Split" or len(split[0].output) != 2:
            continue
        split = split[0]
        axis = node_attrs(split).get("axis", 0)
        sizes = constants.get(split.input[1]) if len(split.input) > 1 else None
        if axis != -1 or sizes is None or numpy_helper.to_array(sizes).tolist() != [attrs["N"] // 2] * 2:
            continue
        gate, up = split.output
        on_gate, on_up = only(gate, 2), only(up)
        sigmoid = [n for n in on_gate if n.op_type == "Sigmoid"]
        silu = [n for n in on_gate if n.op_type == "Mul"]
        if not (sigmoid and silu and on_up and on_up[0].op_type == "Mul") or set(silu[0].input) != {gate, sigmoid[0].output[0]}:
            continue
        product = on_up[0]
        if only(sigmoid[0].output[0]) != silu or only(silu[0].output[0]) != [product] \
                or set(product.input) != {silu[0].output[0], up}:
            continue
        replaced[id(node)] = helper.make_node(OP, list(node.input), [product.output[0]], name=node.name, domain=DOMAIN,
                                               K=attrs["K"], N=attrs["N"], swiglu=1)
        dropped |= {id(split), id(sigmoid[0]), id(silu[0]), id(product)}
        if len(reads.by_name[split.input[1]]) == 1:  # the split sizes, read by nothing else
            graph.initializer.remove(sizes)
    return [replaced.get(id(n), n) for n in nodes if id(n) not in dropped]


def fuse_head_refine(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with the tail of each refined LM head (`head_refine.refine_heads`: TopK of the coarse logits, the
    candidates' 8-bit rows by GatherBlockQuantized, Unsqueeze, MatMul, Squeeze, ReduceMin, Min, ScatterElements) made
    one `adainfer.HeadRefine` node on the same inputs; how many it had. Eight nodes, ~0.12 ms a SmolLM2 int4 token
    (mostly per-node cost), where the kernel takes ~0.03. A tail whose intermediate values anything else reads is
    left to the graph."""
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    reads = _Readers(nodes, model.graph)

    def made(name: str, op: str, read: int = 1):
        node = producer.get(name)
        return node if node is not None and node.op_type == op and reads.only(name, read) else None

    replaced = {}
    for scatter in nodes:
        if scatter.op_type != "ScatterElements" or len(scatter.input) != 3 or node_attrs(scatter).get("axis") != -1:
            continue
        tail, top, exact = scatter.input
        low, squeeze = made(tail, "Min"), made(exact, "Squeeze", 2)
        floor = made(low.input[1], "ReduceMin") if low is not None and len(low.input) == 2 else None
        topk = producer.get(top)
        if any(n is None for n in (low, squeeze, floor, topk)) or floor.input[0] != exact or topk.op_type != "TopK" \
                or not reads.only(top, 2) or topk.input[0] != low.input[0] \
                or node_attrs(topk).get("axis") != -1 or node_attrs(topk).get("largest", 1) != 1 \
                or not reads.unread(topk.output[0]):
            continue
        matmul = made(squeeze.input[0], "MatMul")
        rows = made(matmul.input[0], "GatherBlockQuantized") if matmul is not None else None
        column = made(matmul.input[1], "Unsqueeze") if matmul is not None else None
        if rows is None or column is None or len(rows.input) != 3 or rows.input[1] != top \
                or column.input[1:] != squeeze.input[1:]:  # x made a column and the products squeezed on one axis
            continue
        a = node_attrs(rows)
        if (a.get("bits"), a.get("gather_axis"), a.get("quantize_axis")) != (8, 0, 1):
            continue
        table, _, scales = rows.input
        replaced[id(scatter)] = helper.make_node(
            REFINE_OP, [low.input[0], column.input[0], table, scales, topk.input[1]], [scatter.output[0]],
            name=f"{scatter.name}_fused", domain=DOMAIN, block_size=a["block_size"])
    if replaced:
        kept = _drop_unread([replaced.get(id(n), n) for n in nodes], model.graph)
        del model.graph.node[:]
        model.graph.node.extend(kept)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, len(replaced)


def _drop_unread(nodes: list, graph: onnx.GraphProto) -> list:
    """`nodes` without those whose outputs nothing reads (ONNX operators have no side effects), repeatedly."""
    while True:
        read = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
        kept = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def drop_padding_bias(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with every GroupQueryAttention's `attention_bias` (the mask of left-padded keys) dropped, and the
    nodes that built it; how many attention nodes had one. Only for a merged graph: those run unpadded batches
    only (their attention rotates by cache slot: `rotary_fold.py`, `chain.run_layers`), where the bias is zero."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > ATTENTION_BIAS and node.input[ATTENTION_BIAS]:
            node.input[ATTENTION_BIAS] = ""
            count += 1
        while node.op_type == "GroupQueryAttention" and node.input and not node.input[-1]:
            node.input.pop()
    kept = _drop_unread(list(model.graph.node), model.graph)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model, count


#: head graphs: a refined LM head's tail runs in the library too, at every exit and full-depth token
HEADS = ("final_head", "exit_head")


def add_q4_1_twins(bundle_dir: Path, manifest: Manifest, graphs: Optional[Iterable[str]] = None) -> Manifest:
    """Write the twin of each merged graph and head graph (all of them, or `graphs`) that has Q4_1 groups or a
    refined head's tail into `bundle_dir`, drop twins of graphs that are gone or were written again, and return
    the manifest listing them (saved). The graph-level fusions that go with the Q4_1 kernel (SwiGLU, skip norms, no
    padding bias) are applied where there are Q4_1 groups; a graph with only a refined tail gets only that fused."""
    bundle_dir = Path(bundle_dir)
    before = manifest
    prefix = twin_key("")
    for key, attached in list(manifest.attachments.items()):
        if not key.startswith(prefix):
            continue
        graph = key[len(prefix):]
        spec = manifest.graphs.get(graph)
        if spec is None or attached.file != twin_file(graph, spec.sha256):
            (bundle_dir / attached.file).unlink(missing_ok=True)
            manifest = manifest.detach(key)
    candidates = graphs if graphs is not None else manifest.merged_graphs | set(HEADS)
    for graph in sorted(set(candidates) & set(manifest.graphs)):
        if twin_key(graph) in manifest.attachments:
            continue
        spec = manifest.graphs[graph]
        model, groups = fuse_q4_1(onnx.load(str(bundle_dir / spec.file), load_external_data=False))
        if groups:
            model, _ = fuse_skip_norms(model)
            model, _ = drop_padding_bias(model)
        model, refined = fuse_head_refine(model)
        if groups or refined:
            onnx.save_model(model, str(bundle_dir / twin_file(graph, spec.sha256)))
            manifest = manifest.attach(twin_key(graph), bundle_dir, twin_file(graph, spec.sha256))
    if manifest != before:
        manifest.save(bundle_dir)
    return manifest
