"""Consecutive block graphs merged into one graph (a *span*): one session call instead of several.

A span of blocks `first .. last` (0-based, inclusive) has the inputs `hidden_states, position_ids,
attention_mask, past_key_NN, past_value_NN` (NN = each block's index) and the outputs
`hidden_states_out, present_key_NN, present_value_NN`: each block's graph unchanged, its names
prefixed with `span/NN/`, the hidden state handed from one to the next inside the graph. Weights
kept as ONNX external data stay where they are (the span is written into the bundle directory
and points into the same files), so a span adds no weight bytes on disk. Projections of a merged graph that
read the same input run as one MatMul on their weights concatenated when the session loads
(`projections.fuse_projections_at_load`), and a span's (and the full step's) GroupQueryAttention rotates q/k
itself (`rotary_fold.fold_rotary`), by cache slot: equal to the blocks only for unpadded batches, which are the
only ones the chain runs merged graphs for.

Where the calibrated policy never evaluates an exit, a runtime can run a span instead of its
blocks (the chain then runs segments); `tools/chain_drive.py --spans` measures what that is worth.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from .projections import fuse_projections_at_load
from .rotary_fold import fold_rotary

SHARED_INPUTS = ("position_ids", "attention_mask")


def span_name(first: int, last: int) -> str:
    return f"span_{first:02d}_{last:02d}"


def _renamed(model: onnx.ModelProto, index: int, hidden_in: str) -> onnx.GraphProto:
    """Block `index`'s graph with every name prefixed, except the shared inputs; its hidden input is `hidden_in`,
    its cache inputs and outputs carry the block index."""
    prefix = f"span/{index:02d}/"
    fixed = {name: name for name in SHARED_INPUTS}
    fixed.update({"hidden_states": hidden_in, "past_key": f"past_key_{index:02d}", "past_value": f"past_value_{index:02d}",
                  "present_key": f"present_key_{index:02d}", "present_value": f"present_value_{index:02d}",
                  "hidden_states_out": f"{prefix}hidden_states_out"})

    return prefixed(model, prefix, fixed, f"block {index}")


def prefixed(model: onnx.ModelProto, prefix: str, keep: dict[str, str], what: str) -> onnx.GraphProto:
    """A copy of `model`'s graph with every node, tensor and value name prefixed, except those in `keep`
    (renamed to their value); refused for graphs holding subgraphs (merging takes flat graphs)."""

    def rename(name: str) -> str:
        return keep.get(name, prefix + name) if name else name

    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"{what}: node {node.name} holds a subgraph; merged graphs take flat ones")
        node.name = prefix + node.name
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for tensors in (graph.initializer, graph.sparse_initializer):
        for t in tensors:
            t.name = rename(t.name)
    for infos in (graph.input, graph.output, graph.value_info):
        for v in infos:
            v.name = rename(v.name)
    return graph


def merge_blocks(bundle_dir: Path, block_files: list[str], first: int, out_file: str, out_dir: Path | None = None) -> Path:
    """Write `out_dir/out_file` (default `bundle_dir`): the blocks `block_files` of `bundle_dir` (blocks first,
    first + 1, ...) as one graph. An `out_dir` other than the bundle (a staged update of it) must hold the
    external data files the blocks reference too (links): the span's references are relative to its directory."""
    bundle_dir = Path(bundle_dir)
    models = [onnx.load(str(bundle_dir / f), load_external_data=False) for f in block_files]
    nodes, inits, inputs, outputs, infos = [], [], [], [], []
    hidden = "hidden_states"
    for offset, model in enumerate(models):
        index = first + offset
        graph = _renamed(model, index, hidden)
        nodes += graph.node
        inits += graph.initializer
        infos += graph.value_info
        for v in graph.input:
            if v.name in inputs_seen(inputs) or v.name.startswith("span/"):
                continue
            inputs.append(v)
        for v in graph.output:
            if v.name.startswith("present_"):
                outputs.append(v)
            elif offset + 1 < len(models):
                infos.append(v)
        hidden = f"span/{index:02d}/hidden_states_out"
    last = next(v for v in graph.output if v.name == hidden)
    final = onnx.ValueInfoProto()
    final.CopyFrom(last)
    final.name = "hidden_states_out"
    nodes.append(helper.make_node("Identity", [hidden], ["hidden_states_out"], name="span/hidden_states_out"))
    merged = helper.make_graph(nodes, out_file.removesuffix(".onnx"), inputs, [final] + outputs, inits, value_info=infos)
    return _save_checked(_merged_model(merged, models, models[0].ir_version), bundle_dir, out_dir, out_file)


def _merged_model(graph: onnx.GraphProto, models: list, ir_version: int) -> onnx.ModelProto:
    """`graph` as a model importing, per domain, the highest opset among the `models` it merges, in the forms ONNX
    Runtime runs fastest: projections that read one input fused (at load: no new weight bytes), the rotary inside
    GroupQueryAttention (for unpadded batches only: `rotary_fold.py`)."""
    opsets: dict[str, int] = {}
    for model in models:
        for o in model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="adainfer-spans")
    model.ir_version = ir_version
    return fold_rotary(fuse_projections_at_load(model))


def _save_checked(model: onnx.ModelProto, bundle_dir: Path, out_dir: Path | None, out_file: str) -> Path:
    """Save a merged graph into `out_dir` (default `bundle_dir`) and check it."""
    path = Path(out_dir or bundle_dir) / out_file
    onnx.save_model(model, str(path))
    if out_dir is None or Path(out_dir) == bundle_dir:
        onnx.checker.check_model(str(path))
    else:  # the data files beside a staged span are links, which the checker refuses: check the structure only
        onnx.checker.check_model(_without_external_data(model))
    return path


def fill_name(first: int, last: int) -> str:
    return f"kv_fill_{first:02d}_{last:02d}"


def merge_fills(bundle_dir: Path, fill_files: list[str], first: int, out_file: str, out_dir: Path | None = None) -> Path:
    """Write `out_dir/out_file` (default `bundle_dir`): the kv_fill graphs `fill_files` (layers first, first + 1, ...)
    side by side as one graph reading the same `hidden_states, position_ids` and giving `key_NN, value_NN` per
    layer: an exit's skipped layers filled in one call instead of one call each (weights where they were)."""
    bundle_dir = Path(bundle_dir)
    models = _same_opset([onnx.load(str(bundle_dir / f), load_external_data=False) for f in fill_files])
    nodes, inits, inputs, outputs, infos = [], [], [], [], []
    for offset, model in enumerate(models):
        index = first + offset
        keep = {"hidden_states": "hidden_states", "position_ids": "position_ids",
                "key": f"key_{index:02d}", "value": f"value_{index:02d}"}
        graph = prefixed(model, f"fill/{index:02d}/", keep, f"kv_fill {index}")
        nodes += graph.node
        inits += graph.initializer
        infos += graph.value_info
        inputs += [v for v in graph.input if v.name not in inputs_seen(inputs) and not v.name.startswith("fill/")]
        outputs += list(graph.output)
    kept, alias = _same_bytes_once(inits)
    for node in nodes:
        node.input[:] = [alias.get(n, n) for n in node.input]
    merged = helper.make_graph(nodes, out_file.removesuffix(".onnx"), inputs, outputs, kept, value_info=infos)
    return _save_checked(_merged_model(merged, models, models[0].ir_version), bundle_dir, out_dir, out_file)


def _without_external_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose initializers stored as external data are graph inputs instead (for checking the structure)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    external = [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in external:
        copy.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    kept = [t for t in copy.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    return copy


def inputs_seen(inputs: list) -> set[str]:
    return {v.name for v in inputs}


#: the embedding, every block and the final head as one graph: a full-depth step in one session call
FULL_STEP = "full_step"


def _same_bytes_once(initializers: list) -> tuple[list, dict[str, str]]:
    """Initializers stored at the same external (file, offset, length) with one dtype and shape, kept once
    (a tied model's embedding table and LM head read the same bytes): the kept list and old -> kept names."""
    kept, seen, alias = [], {}, {}
    for t in initializers:
        key = None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in t.external_data}
            key = (where.get("location"), where.get("offset", "0"), where.get("length"), t.data_type, tuple(t.dims))
        if key is not None and key in seen:
            alias[t.name] = seen[key]
            continue
        if key is not None:
            seen[key] = t.name
        kept.append(t)
    return kept, alias


def _same_opset(models: list) -> list:
    """The models with one default-domain opset (the highest among them; a converted bundle's quantized graphs
    may carry a newer one than its blocks): the others upgraded by ONNX's version converter."""
    from onnx import version_converter

    def default(model) -> int:
        return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

    target = max(default(m) for m in models)
    return [m if default(m) == target else version_converter.convert_version(m, target) for m in models]


def merge_full_step(bundle_dir: Path, embed_file: str, span_file: str, head_file: str, out_file: str,
                    out_dir: Path | None = None) -> Path:
    """Write `out_file`: embed -> span (all blocks) -> final head at every row's last position, one graph.
    Inputs `input_ids, position_ids, attention_mask, past_key_NN, past_value_NN`; outputs `logits`
    (batch, vocab) and `present_key_NN, present_value_NN`. Weights stay where the three graphs keep them. Like a
    span's, its attention rotates q and k itself (`rotary_fold.fold_rotary`): by cache slot, which is the position in
    unpadded batches only."""
    bundle_dir = Path(bundle_dir)
    load = lambda f: onnx.load(str(bundle_dir / f), load_external_data=False)  # noqa: E731
    embed, span, head = _same_opset([load(embed_file), load(span_file), load(head_file)])
    e = prefixed(embed, "embed/", {"input_ids": "input_ids", "position_ids": "position_ids",
                                   "hidden_states": "hidden_states"}, "embed")
    s = span.graph
    h = prefixed(head, "head/", {"hidden_states": "head/rows", "logits": "logits"}, "final head")
    last = helper.make_tensor("full_step/last_position", onnx.TensorProto.INT64, [], [-1])
    pick = helper.make_node("Gather", ["hidden_states_out", last.name], ["head/rows"], axis=1, name="full_step/last_rows")
    initializers, alias = _same_bytes_once([*e.initializer, *s.initializer, last, *h.initializer])
    nodes = [*e.node, *s.node, pick, *h.node]
    for node in nodes:
        node.input[:] = [alias.get(n, n) for n in node.input]
    inputs = [*e.input, *(v for v in s.input if v.name not in {i.name for i in e.input} | {"hidden_states"})]
    outputs = [*h.output, *(v for v in s.output if v.name != "hidden_states_out")]
    infos = [*e.output, *e.value_info, *s.value_info, *h.value_info,
             *(v for v in s.output if v.name == "hidden_states_out")]
    graph = helper.make_graph(nodes, out_file.removesuffix(".onnx"), inputs, outputs, initializers, value_info=infos)
    model = _merged_model(graph, [embed, span, head], max(embed.ir_version, span.ir_version, head.ir_version))
    path = Path(out_dir or bundle_dir) / out_file
    onnx.save_model(model, str(path))
    onnx.checker.check_model(_without_external_data(model))
    return path
