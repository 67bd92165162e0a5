"""Attention pieces shared by the families, written for ONNX export.

The KV cache is passed in and out as plain tensors of shape
(batch, kv_heads, length, head_dim); keys are stored after the rotary embedding.
The causal and padding mask is built inside the graph from the 2-D padding mask,
so a prefill can never silently become non-causal.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """cos/sin of shape (batch, seq, head_dim), as Hugging Face's rotary modules compute them."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding on (batch, heads, seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def causal_attention(q, k, v, attention_mask, scale: float, window: int | None = None):
    """Softmax attention of q (b, h, s, d) over k, v (b, kv_h, past + s, d).

    `attention_mask` is (b, past + s) with 1 for real tokens and 0 for padding.
    A query at position i sees keys j <= i (and j > i - window with a sliding window).
    Scores and softmax are float32 whatever the weights' dtype.
    """
    batch, heads, seq, head_dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    if kv_heads != heads:
        groups = heads // kv_heads
        k = k[:, :, None].expand(batch, kv_heads, groups, total, head_dim).reshape(batch, heads, total, head_dim)
        v = v[:, :, None].expand(batch, kv_heads, groups, total, head_dim).reshape(batch, heads, total, head_dim)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * scale
    key_pos = torch.arange(total, device=q.device)
    query_pos = torch.arange(seq, device=q.device) + (total - seq)
    allowed = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        allowed = allowed & (key_pos[None, :] > query_pos[:, None] - window)
    allowed = allowed[None, None] & (attention_mask[:, None, None, :] > 0)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def matmul_macs(*weights: torch.Tensor) -> int:
    """Multiply-accumulates per token of the matrices applied once per token."""
    return int(sum(w.numel() for w in weights if w is not None))
