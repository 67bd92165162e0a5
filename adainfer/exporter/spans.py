"""Consecutive block graphs merged into one graph (a *span*): one session call instead of several.

A span of blocks `first .. last` (0-based, inclusive) has the inputs `hidden_states, position_ids,
attention_mask, past_key_NN, past_value_NN` (NN = each block's index) and the outputs
`hidden_states_out, present_key_NN, present_value_NN`: each block's graph unchanged, its names
prefixed with `span/NN/`, the hidden state handed from one to the next inside the graph. Weights
kept as ONNX external data stay where they are (the span is written into the bundle directory
and points into the same files), so a span adds no weight bytes on disk.

Where the calibrated policy never evaluates an exit, a runtime can run a span instead of its
blocks (the chain then runs segments); `tools/chain_drive.py --spans` measures what that is worth.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

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
                  "hidden_states_out": f"{prefix}hidden_states_out", "": ""})

    def rename(name: str) -> str:
        return fixed.get(name, prefix + name)

    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"block {index}: node {node.name} holds a subgraph; spans take flat block graphs")
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
    opsets: dict[str, int] = {}
    for offset, model in enumerate(models):
        index = first + offset
        for o in model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
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
    model = helper.make_model(merged, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="adainfer-spans")
    model.ir_version = models[0].ir_version
    path = Path(out_dir or bundle_dir) / out_file
    onnx.save_model(model, str(path))
    if out_dir is None or Path(out_dir) == bundle_dir:
        onnx.checker.check_model(str(path))
    else:  # the data files beside a staged span are links, which the checker refuses: check the structure only
        onnx.checker.check_model(_without_external_data(model))
    return path


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
