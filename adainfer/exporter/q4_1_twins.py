"""Twins of the merged graphs whose exact Q4_1 groups are each one fused kernel node (runtime/q4_1_kernel.py).

A Q4_1 group, as `gguf_grid.encode_exact` writes it, is a MatMulNBits on q - 8 (`*_Q4`) whose output an Add
(`*_add_offset`) sums with `blocksum(x) @ (m + 8 d)` (a MatMul `*_gguf_offset` on the input's block sums). The twin
replaces the three nodes by one `adainfer.MatMulQ4_1(x, codes, scales, m + 8 d)` on the same initializers (so it
adds no weight bytes: it points into the same data files) and drops the block sums nothing else reads. Written
after the merged graphs are final (their digest is in the twin's name), listed in the manifest's attachments (like
the merged graphs, outside the bundle's digest: a calibrated policy stays valid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import onnx
from onnx import helper

from ..manifest import Manifest
from ..runtime.q4_1_kernel import DOMAIN, OP, twin_file, twin_key


def fuse_q4_1(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with every Q4_1 group replaced by one fused node; how many groups it had."""
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    fused, dropped = {}, set()
    for node in nodes:
        if not node.name.endswith("_add_offset") or node.op_type != "Add":
            continue
        nbits, offset = producer.get(node.input[0]), producer.get(node.input[1])
        if nbits is None or offset is None or nbits.op_type != "MatMulNBits" or offset.op_type != "MatMul":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in nbits.attribute}
        if len(nbits.input) != 3 or attrs.get("bits") != 4 or attrs.get("block_size") != 32:
            continue
        fused[node.name] = helper.make_node(OP, [*nbits.input[:3], offset.input[1]], [node.output[0]],
                                            name=f"{nbits.name}_fused", domain=DOMAIN, K=attrs["K"], N=attrs["N"])
        dropped |= {nbits.name, offset.name}
    kept = [fused.get(n.name, n) for n in nodes if n.name not in dropped]
    while True:  # the block sums (and their reshapes) nothing reads any more
        read = {name for n in kept for name in n.input} | {o.name for o in model.graph.output}
        unused = [n for n in kept if n.op_type in ("Reshape", "ReduceSum") and not any(o in read for o in n.output)]
        if not unused:
            break
        kept = [n for n in kept if n not in unused]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if fused and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, len(fused)


def add_q4_1_twins(bundle_dir: Path, manifest: Manifest, graphs: Optional[Iterable[str]] = None) -> Manifest:
    """Write the twin of each merged graph (all of them, or `graphs`) that has Q4_1 groups into `bundle_dir`, drop
    twins of graphs that are gone or were written again, and return the manifest listing them (saved)."""
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
    for graph in sorted(set(graphs if graphs is not None else manifest.merged_graphs) & set(manifest.graphs)):
        if twin_key(graph) in manifest.attachments:
            continue
        spec = manifest.graphs[graph]
        model, groups = fuse_q4_1(onnx.load(str(bundle_dir / spec.file), load_external_data=False))
        if groups:
            onnx.save_model(model, str(bundle_dir / twin_file(graph, spec.sha256)))
            manifest = manifest.attach(twin_key(graph), bundle_dir, twin_file(graph, spec.sha256))
    if manifest != before:
        manifest.save(bundle_dir)
    return manifest
