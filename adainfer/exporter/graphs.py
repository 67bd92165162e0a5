"""The bundle's graphs as torch modules with names, example inputs and dynamic axes.

Each `GraphDef` is everything `torch.onnx.export` and the verifier need for one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import onnx
import torch
from torch import nn

from .families import FamilyAdapter


class ExitHead(nn.Module):
    """Final norm -> LM head -> softmax -> (top-1 id, top-1 prob, gap = p1 - p2).

    The vocabulary-sized distribution never leaves the graph: a layer's exit decision
    needs three numbers per row.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden_states: torch.Tensor):
        probs = torch.softmax(self.head(hidden_states).float(), dim=-1)
        top = torch.topk(probs, k=2, dim=-1)
        return top.indices[:, 0], top.values[:, 0], top.values[:, 0] - top.values[:, 1]


class KVFill(nn.Module):
    """(hidden_states, position_ids) -> (key, value) of one layer: fills a skipped layer's cache."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        return self.block.project_kv(hidden_states, position_ids)


@dataclass
class GraphDef:
    """`module` is the PyTorch reference; the file is its trace, or `build()`'s ONNX model when given
    (a block written directly with fused operators, verified against `module` all the same)."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    build: Optional[Callable[[], onnx.ModelProto]] = None


def example_block_inputs(geometry, batch=2, seq=3, past=4, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    total = past + seq
    mask = torch.ones(batch, total, dtype=torch.int64)
    mask[0, :2] = 0  # left padding in the first row
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv_shape = (batch, geometry.num_kv_heads, past, geometry.head_dim)
    return {
        "hidden_states": torch.randn(batch, seq, geometry.hidden_size, generator=g),
        "position_ids": position_ids,
        "attention_mask": mask,
        "past_key": torch.randn(*kv_shape, generator=g),
        "past_value": torch.randn(*kv_shape, generator=g),
    }


def example_embed_inputs(adapter: FamilyAdapter, batch=2, seq=3, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    geometry = adapter.geometry()
    inputs = {"input_ids": torch.randint(0, geometry.vocab_size, (batch, seq), generator=g)}
    if adapter.embed_takes_positions:
        inputs["position_ids"] = torch.arange(seq).repeat(batch, 1) + 1
    return inputs


def example_head_inputs(geometry, rows=3, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(rows, geometry.hidden_size, generator=g)}


BLOCK_AXES = {
    "hidden_states": {0: "batch", 1: "sequence"},
    "position_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "total_length"},
    "past_key": {0: "batch", 2: "past_length"},
    "past_value": {0: "batch", 2: "past_length"},
    "hidden_states_out": {0: "batch", 1: "sequence"},
    "present_key": {0: "batch", 2: "total_length"},
    "present_value": {0: "batch", 2: "total_length"},
}


def graph_defs(adapter: FamilyAdapter, seed: int = 0, fused: bool = True) -> list[GraphDef]:
    """The graphs of a bundle in export order: embed, blocks, kv fills, exit head, final head.

    With `fused`, blocks the adapter can write with ONNX Runtime's fused operators
    (`FamilyAdapter.fused_block`) are; verification skips the example (three tokens on a cache in
    a batch of two), which the fused attention refuses and the runtime never runs."""
    geometry = adapter.geometry()
    embed_inputs = example_embed_inputs(adapter, seed=seed)
    defs = [GraphDef("embed", adapter.embed(), embed_inputs, ["hidden_states"],
                     {**{n: {0: "batch", 1: "sequence"} for n in embed_inputs}, "hidden_states": {0: "batch", 1: "sequence"}})]
    for i in range(geometry.num_layers):
        build = adapter.fused_block(i) if fused else None
        inputs = example_block_inputs(geometry, seed=seed + i)
        defs.append(GraphDef(f"block_{i:02d}", adapter.block(i), inputs,
                             ["hidden_states_out", "present_key", "present_value"], BLOCK_AXES, build))
    for i in range(geometry.num_layers):
        block_inputs = example_block_inputs(geometry, seed=seed + i)
        defs.append(GraphDef(f"kv_fill_{i:02d}", KVFill(adapter.block(i)),
                             {k: block_inputs[k] for k in ("hidden_states", "position_ids")}, ["key", "value"],
                             {"hidden_states": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
                              "key": {0: "batch", 2: "sequence"}, "value": {0: "batch", 2: "sequence"}}))
    head = adapter.head()
    rows = {0: "rows"}
    defs.append(GraphDef("exit_head", ExitHead(head), example_head_inputs(geometry, seed=seed),
                         ["top1_id", "top1_prob", "gap"],
                         {"hidden_states": rows, "top1_id": rows, "top1_prob": rows, "gap": rows}))
    defs.append(GraphDef("final_head", head, example_head_inputs(geometry, seed=seed), ["logits"],
                         {"hidden_states": rows, "logits": rows}))
    for gdef in defs:  # wrappers start in training mode, and torch.onnx.export restores that mode recursively
        gdef.module.eval()
    return defs
