"""OPT: LayerNorm before or after each sub-layer, biased projections, learned positions offset by 2."""

from __future__ import annotations

import torch
from torch import nn

from ...manifest import MacCount
from ..attention import causal_attention, matmul_macs, split_heads
from .base import FamilyAdapter, Geometry, Head


class OPTEmbed(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.embed_tokens = decoder.embed_tokens
        self.project_in = decoder.project_in
        self.positions = decoder.embed_positions
        self.offset = decoder.embed_positions.offset

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.embed_tokens(input_ids)
        if self.project_in is not None:
            tokens = self.project_in(tokens)
        return tokens + nn.functional.embedding(position_ids + self.offset, self.positions.weight)


class OPTBlock(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        attn = layer.self_attn
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        self.self_attn_layer_norm, self.final_layer_norm = layer.self_attn_layer_norm, layer.final_layer_norm
        self.fc1, self.fc2, self.activation = layer.fc1, layer.fc2, layer.activation_fn
        self.pre_norm = layer.do_layer_norm_before
        self.head_dim, self.scale = attn.head_dim, attn.scaling

    def forward(self, hidden_states, position_ids, attention_mask, past_key, past_value):
        residual = hidden_states
        x = self.self_attn_layer_norm(hidden_states) if self.pre_norm else hidden_states
        q = split_heads(self.q_proj(x) * self.scale, self.head_dim)
        k = split_heads(self.k_proj(x), self.head_dim)
        v = split_heads(self.v_proj(x), self.head_dim)
        present_key = torch.cat((past_key, k), dim=2)
        present_value = torch.cat((past_value, v), dim=2)
        hidden_states = residual + self.out_proj(causal_attention(q, present_key, present_value, attention_mask, 1.0))
        if not self.pre_norm:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        residual = hidden_states
        x = self.final_layer_norm(hidden_states) if self.pre_norm else hidden_states
        hidden_states = residual + self.fc2(self.activation(self.fc1(x)))
        if not self.pre_norm:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states, present_key, present_value

    def project_kv(self, hidden_states, position_ids):
        """This layer's keys and values for `hidden_states`."""
        x = self.self_attn_layer_norm(hidden_states) if self.pre_norm else hidden_states
        return split_heads(self.k_proj(x), self.head_dim), split_heads(self.v_proj(x), self.head_dim)


class OPTAdapter(FamilyAdapter):
    name = "opt"
    model_types = ("opt",)
    embed_takes_positions = True

    @property
    def _decoder(self):
        return self.model.model.decoder

    def geometry(self) -> Geometry:
        c = self.config
        return Geometry(
            num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings, num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads, head_dim=c.hidden_size // c.num_attention_heads,
        )

    def embed(self) -> nn.Module:
        return OPTEmbed(self._decoder)

    def block(self, index: int) -> nn.Module:
        return OPTBlock(self._decoder.layers[index])

    def head(self) -> nn.Module:
        return Head(self._decoder.final_layer_norm, self._decoder.project_out, self.model.lm_head)

    def embed_macs(self) -> int:
        p = self._decoder.project_in
        return matmul_macs(p.weight) if p is not None else 0

    def block_macs(self, index: int) -> MacCount:
        layer = self._decoder.layers[index]
        a = layer.self_attn
        constant = matmul_macs(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.out_proj.weight,
                               layer.fc1.weight, layer.fc2.weight)
        return MacCount(constant=constant, per_context_token=self.attention_macs_per_context_token())

    def kv_fill_macs(self, index: int) -> int:
        a = self._decoder.layers[index].self_attn
        return matmul_macs(a.k_proj.weight, a.v_proj.weight)

    def head_macs(self) -> int:
        p = self._decoder.project_out
        return matmul_macs(self.model.lm_head.weight, p.weight if p is not None else None)
