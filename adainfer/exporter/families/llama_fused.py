"""A Llama-layout decoder block written directly as ONNX with ONNX Runtime's fused CPU operators.

Why: the traced torch block (`LlamaBlock`) is ~100 ONNX nodes per call (rotary, mask building,
grouped-KV expansion, softmax pieces); on SmolLM2 a decode step runs 30 of them and the small
nodes cost as much as the weight MatMuls (tools/decode_profile.py). onnxruntime-genai's builder
emits the same block as ~12 nodes with contrib operators; this writes that form, keeping the
bundle's block interface unchanged (hidden_states, position_ids, attention_mask, past_key,
past_value -> hidden_states_out, present_key, present_value), so the runtime, the KV cache
handling (fork, truncate, kv_fill) and the manifest do not change:

    RMSNorm (fused by ORT into SimplifiedLayerNormalization) -> q/k/v MatMul (+bias) -> RotaryEmbedding(q), RotaryEmbedding(k)
    (by position_ids, so left-padded rows rotate by their real positions) -> GroupQueryAttention
    (past ++ new -> present, causal) -> o_proj MatMul -> SkipSimplifiedLayerNormalization
    (residual add + norm) -> gate/up MatMul, SiLU, down MatMul -> Add (residual)

Left padding: GroupQueryAttention's `seqlens_k` assumes right padding (keys [0, seqlens_k] are
valid). Every row of our cache has the same slot count (padding included), so `seqlens_k` is
`total_length - 1` for every row and the padding keys are masked by `attention_bias`, built
from `attention_mask` as torch's `causal_attention` does (finfo.min on padded keys). Outputs at
padded query positions differ from the torch block (it averages over all keys there, the fused
kernel over the causal prefix); nothing ever reads them, and verification compares real
positions only. The kernel refuses `sequence_length > 1` with a past and `batch > 1` (its
documented restriction): the runtime never does that (prefill has no past; decode steps and
speculative verification are one row or one token).

Used when the block is plain Llama attention (no sliding window) with a SiLU MLP; other
configurations keep the traced torch block. The q/k/v weights are stored as W^T exactly as the
traced `kv_fill_NN` graphs store theirs, so the bundle's shared-weight pass stores them once.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MS = "com.microsoft"


def can_fuse(block, hidden_act: str) -> bool:
    """Whether `block` (a `LlamaBlock`) has the layout this writer reproduces."""
    mlp = block.mlp
    return (block.window is None and hidden_act == "silu"
            and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and hasattr(block.input_layernorm, "variance_epsilon"))


def rotary_caches(inv_freq: torch.Tensor, scaling: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_positions, head_dim / 2) computed as `attention.rotary_cos_sin` computes them."""
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq.float()[None, :]
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()


def fused_block_model(block, num_heads: int, num_kv_heads: int, max_positions: int, name: str) -> onnx.ModelProto:
    """The ONNX model of one `LlamaBlock` with contrib operators (see the module docstring)."""
    head_dim = block.head_dim
    hidden = block.q_proj.weight.shape[1]
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(value: np.ndarray, label: str) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), label))
        return label

    def weight_t(linear: torch.nn.Linear, label: str) -> str:
        return const(linear.weight.detach().float().numpy().T.copy(), f"{label}.weight_t")

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{name}/{outputs[0]}", domain=domain, **attrs))

    def linear(x: str, module: torch.nn.Linear, label: str) -> str:
        node("MatMul", [x, weight_t(module, label)], [f"{label}_mm"])
        if module.bias is None:
            return f"{label}_mm"
        node("Add", [f"{label}_mm", const(module.bias.detach().float().numpy(), f"{label}.bias")], [label])
        return label

    eps_in = float(block.input_layernorm.variance_epsilon)
    eps_post = float(block.post_attention_layernorm.variance_epsilon)
    cos, sin = rotary_caches(block.inv_freq, block.rope_scaling, max_positions)
    cos_name, sin_name = const(cos, "rotary.cos_cache"), const(sin, "rotary.sin_cache")

    # RMSNorm as the primitive pattern ONNX Runtime fuses into SimplifiedLayerNormalization (that op is
    # registered in the default domain by ONNX Runtime only, so the onnx checker would refuse it)
    node("Pow", ["hidden_states", const(np.array(2.0, np.float32), "two_f")], ["x_sq"])
    node("ReduceMean", ["x_sq"], ["x_ms"], axes=[-1], keepdims=1)
    node("Add", ["x_ms", const(np.array(eps_in, np.float32), "eps_in")], ["x_ms_eps"])
    node("Sqrt", ["x_ms_eps"], ["x_rms"])
    node("Div", ["hidden_states", "x_rms"], ["x_scaled"])
    node("Mul", ["x_scaled", const(block.input_layernorm.weight.detach().float().numpy(), "input_layernorm.weight")],
         ["x_norm"])
    q = linear("x_norm", block.q_proj, "q_proj")
    k = linear("x_norm", block.k_proj, "k_proj")
    v = linear("x_norm", block.v_proj, "v_proj")
    node("RotaryEmbedding", [q, "position_ids", cos_name, sin_name], ["q_rot"], domain=MS, interleaved=0)
    node("RotaryEmbedding", [k, "position_ids", cos_name, sin_name], ["k_rot"], domain=MS, interleaved=0)

    # padding -> additive bias (batch, 1, sequence, total_length); every row's seqlens_k = total_length - 1
    node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
    node("Sub", [const(np.array(1.0, np.float32), "one_f"), "mask_f"], ["pad_f"])
    node("Mul", ["pad_f", const(np.array(np.finfo(np.float32).min, np.float32), "min_f")], ["bias_2d"])
    node("Unsqueeze", ["bias_2d", const(np.array([1, 2], np.int64), "axes_12")], ["bias_b11t"])
    node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT)
    node("Mul", ["pos_f", const(np.array(0.0, np.float32), "zero_f")], ["zeros_bs"])
    node("Unsqueeze", ["zeros_bs", const(np.array([1, 3], np.int64), "axes_13")], ["zeros_b1s1"])
    node("Add", ["bias_b11t", "zeros_b1s1"], ["attention_bias"])
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", const(np.array(1, np.int64), "index_1")], ["total_i64"], axis=0)
    node("Cast", ["total_i64"], ["total_sequence_length"], to=TensorProto.INT32)
    node("ReduceSum", ["mask_f", const(np.array([1], np.int64), "axes_1")], ["mask_rows"], keepdims=0)
    node("Mul", ["mask_rows", "zero_f"], ["zeros_b"])
    node("Cast", ["zeros_b"], ["zeros_b_i32"], to=TensorProto.INT32)
    node("Sub", ["total_sequence_length", const(np.array(1, np.int32), "one_i32")], ["last_index"])
    node("Add", ["zeros_b_i32", "last_index"], ["seqlens_k"])

    node("GroupQueryAttention", ["q_rot", "k_rot", v, "past_key", "past_value", "seqlens_k", "total_sequence_length",
                                 "", "", "", "attention_bias"],
         ["attn", "present_key", "present_value"], domain=MS, num_heads=num_heads, kv_num_heads=num_kv_heads,
         scale=float(block.scale), do_rotary=0, local_window_size=-1)
    o = linear("attn", block.o_proj, "o_proj")
    node("SkipSimplifiedLayerNormalization", ["hidden_states", o, const(
        block.post_attention_layernorm.weight.detach().float().numpy(), "post_attention_layernorm.weight")],
         ["mlp_in", "", "", "residual"], domain=MS, epsilon=eps_post)
    gate = linear("mlp_in", block.mlp.gate_proj, "gate_proj")
    up = linear("mlp_in", block.mlp.up_proj, "up_proj")
    node("Sigmoid", [gate], ["gate_sigmoid"])
    node("Mul", [gate, "gate_sigmoid"], ["gate_silu"])
    node("Mul", ["gate_silu", up], ["mlp_product"])
    down = linear("mlp_product", block.mlp.down_proj, "down_proj")
    node("Add", ["residual", down], ["hidden_states_out"])

    f = TensorProto.FLOAT
    kv = ["batch", num_kv_heads, "past_length", head_dim]
    inputs = [helper.make_tensor_value_info("hidden_states", f, ["batch", "sequence", hidden]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_length"]),
              helper.make_tensor_value_info("past_key", f, kv), helper.make_tensor_value_info("past_value", f, kv)]
    present = ["batch", num_kv_heads, "total_length", head_dim]
    outputs = [helper.make_tensor_value_info("hidden_states_out", f, ["batch", "sequence", hidden]),
               helper.make_tensor_value_info("present_key", f, present),
               helper.make_tensor_value_info("present_value", f, present)]
    # types of the contrib operators' outputs, which onnx's shape inference cannot derive (the
    # quantizers in exporter/quantize.py need every MatMul input's type)
    heads_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    value_info = [helper.make_tensor_value_info(n, f, ["batch", "sequence", width]) for n, width in
                  (("q_rot", heads_width), ("k_rot", kv_width), ("attn", heads_width), ("mlp_in", hidden),
                   ("residual", hidden))]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits, value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="adainfer")
    model.ir_version = 8
    return model
