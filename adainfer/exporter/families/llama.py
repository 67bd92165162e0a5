"""Llama layout: RMSNorm, rotary attention with grouped KV heads, gated MLP.

Covers Llama, Mistral (sliding window), Qwen2 (q/k/v biases, per-layer sliding window),
SmolLM and TinyLlama, which differ only in config values.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ...manifest import MacCount
from ..attention import apply_rotary, causal_attention, matmul_macs, rotary_cos_sin, split_heads
from .base import FamilyAdapter, Geometry, Head
from .llama_fused import can_fuse, fused_block_model


class LlamaEmbed(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class LlamaBlock(nn.Module):
    """One decoder layer, read top to bottom: norm, attention, residual, norm, MLP, residual."""

    def __init__(self, layer: nn.Module, inv_freq: torch.Tensor, rope_scaling: float, window: int | None):
        super().__init__()
        attn = layer.self_attn
        self.input_layernorm = layer.input_layernorm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.window = window
        self.rope_scaling = rope_scaling
        self.register_buffer("inv_freq", inv_freq.detach().clone().float(), persistent=False)

    def forward(self, hidden_states, position_ids, attention_mask, past_key, past_value):
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        q = split_heads(self.q_proj(x), self.head_dim)
        k = split_heads(self.k_proj(x), self.head_dim)
        v = split_heads(self.v_proj(x), self.head_dim)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, self.rope_scaling)
        q = apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype))
        k = apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))
        present_key = torch.cat((past_key, k), dim=2)
        present_value = torch.cat((past_value, v), dim=2)
        attn = causal_attention(q, present_key, present_value, attention_mask, self.scale, self.window)
        hidden_states = residual + self.o_proj(attn)
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, present_key, present_value

    def project_kv(self, hidden_states, position_ids):
        """This layer's keys and values for `hidden_states` (CALM's state propagation fills skipped layers so)."""
        x = self.input_layernorm(hidden_states)
        k = split_heads(self.k_proj(x), self.head_dim)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, self.rope_scaling)
        return apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype)), split_heads(self.v_proj(x), self.head_dim)


class LlamaAdapter(FamilyAdapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def check_config(self) -> None:
        act = getattr(self.config, "hidden_act", "silu")
        if act not in ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise UnsupportedModelError(f"{self.config.model_type}: activation {act!r} is not supported")
        if getattr(self.config, "pretraining_tp", 1) not in (None, 1):
            raise UnsupportedModelError("llama: pretraining_tp > 1 is not supported")

    @property
    def _decoder(self):
        return self.model.model

    def geometry(self) -> Geometry:
        c = self.config
        attn = self._decoder.layers[0].self_attn
        return Geometry(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=attn.head_dim,
        )

    def window(self, index: int) -> int | None:
        c = self.config
        layer_types = getattr(c, "layer_types", None)
        if layer_types is not None:
            return c.sliding_window if layer_types[index] == "sliding_attention" else None
        if c.model_type == "mistral":
            return getattr(c, "sliding_window", None)
        return None

    def embed(self) -> nn.Module:
        return LlamaEmbed(self._decoder.embed_tokens)

    def block(self, index: int) -> nn.Module:
        rotary = self._decoder.rotary_emb
        return LlamaBlock(self._decoder.layers[index], rotary.inv_freq, float(rotary.attention_scaling), self.window(index))

    def head(self) -> nn.Module:
        return Head(self._decoder.norm, self.model.lm_head)

    def fused_block(self, index: int):
        """GroupQueryAttention / RotaryEmbedding / fused norms (see `llama_fused`) where the layout allows."""
        block = self.block(index)
        if not can_fuse(block, getattr(self.config, "hidden_act", "silu")):
            return None
        g = self.geometry()
        return lambda: fused_block_model(block, g.num_heads, g.num_kv_heads, g.max_positions, f"block_{index:02d}")

    def block_macs(self, index: int) -> MacCount:
        layer = self._decoder.layers[index]
        a, m = layer.self_attn, layer.mlp
        constant = matmul_macs(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                               m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
        return MacCount(constant=constant, per_context_token=self.attention_macs_per_context_token())

    def head_macs(self) -> int:
        return matmul_macs(self.model.lm_head.weight)

    def kv_fill_macs(self, index: int) -> int:
        a = self._decoder.layers[index].self_attn
        return matmul_macs(a.k_proj.weight, a.v_proj.weight)
