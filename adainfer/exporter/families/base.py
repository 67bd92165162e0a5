"""What every family adapter provides: torch modules with the bundle's graph interfaces.

An adapter wraps a loaded Hugging Face model and hands out, for export:
- `embed()`: (input_ids[, position_ids]) -> hidden_states
- `block(i)`: (hidden_states, position_ids, attention_mask, past_key, past_value)
  -> (hidden_states, present_key, present_value)
- `head()`: hidden_states (rows, hidden) -> logits (rows, vocab): final norm + LM head
- each block module's `project_kv(hidden_states, position_ids)` -> (key, value): the layer's
  cache entries for a hidden state, used to fill layers an early exit skipped
plus the geometry and per-token multiply-accumulate counts the manifest records.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ...manifest import MacCount


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


class FamilyAdapter(ABC):
    """One per architecture family; chosen from `config.model_type`."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    #: whether the embedding graph takes position ids (learned position embeddings)
    embed_takes_positions: bool = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_config()

    def check_config(self) -> None:
        """Refuse configurations the blocks below do not reproduce."""

    @abstractmethod
    def geometry(self) -> Geometry: ...

    @abstractmethod
    def embed(self) -> nn.Module: ...

    @abstractmethod
    def block(self, index: int) -> nn.Module: ...

    @abstractmethod
    def head(self) -> nn.Module: ...

    @abstractmethod
    def block_macs(self, index: int) -> MacCount: ...

    @abstractmethod
    def head_macs(self) -> int: ...

    @abstractmethod
    def kv_fill_macs(self, index: int) -> int:
        """MACs per token of layer `index`'s key/value projections (a kv_fill graph)."""

    def fused_block(self, index: int) -> Optional[Callable[[], "onnx.ModelProto"]]:
        """A builder of block `index` as an ONNX model with ONNX Runtime's fused operators, or None
        (the traced `block(index)` is exported). The result must match `block(index)` on real positions."""
        return None

    def embed_macs(self) -> int:
        return 0

    def attention_macs_per_context_token(self) -> int:
        """QK^T and the weighted sum of V: 2 * heads * head_dim per key attended."""
        g = self.geometry()
        return 2 * g.num_heads * g.head_dim


class Head(nn.Module):
    """Final norm (and projection) followed by the LM head."""

    def __init__(self, *stages: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList([s for s in stages if s is not None])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            hidden_states = stage(hidden_states)
        return hidden_states.float()
