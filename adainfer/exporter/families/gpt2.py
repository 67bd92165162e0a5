"""GPT-2: LayerNorm, fused Conv1D q/k/v projection, learned absolute positions."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ...manifest import MacCount
from ..attention import causal_attention, matmul_macs, split_heads
from .base import FamilyAdapter, Geometry, Head


class GPT2Embed(nn.Module):
    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding):
        super().__init__()
        self.wte, self.wpe = wte, wpe

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) + self.wpe(position_ids)


class GPT2Block(nn.Module):
    def __init__(self, layer: nn.Module, head_dim: int, scale: float):
        super().__init__()
        self.ln_1, self.c_attn, self.c_proj = layer.ln_1, layer.attn.c_attn, layer.attn.c_proj
        self.ln_2, self.mlp = layer.ln_2, layer.mlp
        self.head_dim, self.scale = head_dim, scale

    def forward(self, hidden_states, position_ids, attention_mask, past_key, past_value):
        residual = hidden_states
        q, k, v = self.c_attn(self.ln_1(hidden_states)).chunk(3, dim=-1)
        q, k, v = split_heads(q, self.head_dim), split_heads(k, self.head_dim), split_heads(v, self.head_dim)
        present_key = torch.cat((past_key, k), dim=2)
        present_value = torch.cat((past_value, v), dim=2)
        attn = causal_attention(q, present_key, present_value, attention_mask, self.scale)
        hidden_states = residual + self.c_proj(attn)
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, present_key, present_value

    def project_kv(self, hidden_states, position_ids):
        """This layer's keys and values for `hidden_states` (the k and v thirds of c_attn)."""
        _, k, v = self.c_attn(self.ln_1(hidden_states)).chunk(3, dim=-1)
        return split_heads(k, self.head_dim), split_heads(v, self.head_dim)


class GPT2Adapter(FamilyAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    embed_takes_positions = True

    def check_config(self) -> None:
        if getattr(self.config, "add_cross_attention", False):
            raise UnsupportedModelError("gpt2: cross-attention models are not supported")

    def geometry(self) -> Geometry:
        c = self.config
        return Geometry(
            num_layers=c.n_layer, hidden_size=c.n_embd, vocab_size=c.vocab_size,
            max_positions=c.n_positions, num_heads=c.n_head, num_kv_heads=c.n_head,
            head_dim=c.n_embd // c.n_head,
        )

    def embed(self) -> nn.Module:
        t = self.model.transformer
        return GPT2Embed(t.wte, t.wpe)

    def block(self, index: int) -> nn.Module:
        c = self.config
        head_dim = c.n_embd // c.n_head
        scale = head_dim ** -0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(index + 1)
        return GPT2Block(self.model.transformer.h[index], head_dim, scale)

    def head(self) -> nn.Module:
        return Head(self.model.transformer.ln_f, self.model.lm_head)

    def block_macs(self, index: int) -> MacCount:
        layer = self.model.transformer.h[index]
        constant = matmul_macs(layer.attn.c_attn.weight, layer.attn.c_proj.weight,
                               layer.mlp.c_fc.weight, layer.mlp.c_proj.weight)
        return MacCount(constant=constant, per_context_token=self.attention_macs_per_context_token())

    def head_macs(self) -> int:
        return matmul_macs(self.model.lm_head.weight)

    def kv_fill_macs(self, index: int) -> int:
        return 2 * self.config.n_embd * self.config.n_embd  # two thirds of c_attn (the fused graph computes all three)
