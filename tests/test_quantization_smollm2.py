"""Quantized bundles of the real model (SmolLM2-135M-Instruct, from its Q4_1 GGUF): int4, int8-weight and fp16
convert from one float32 export and pass their quality check on held-out text; int4 keeps the GGUF's own
weights. int8-dynamic is refused: one activation scale per tensor cannot hold SmolLM2's massive activations
(residual stream up to ~770 by block 2; block 1 alone is 46% off in relative RMS), top-1 agreement 0.000.

One float32 bundle (the session fixture) is converted four ways (`convert_bundle`), ~1 min each on 2 cores.
"""

from __future__ import annotations

import collections
import os
import shutil

import numpy as np
import onnx
import pytest

from adainfer.errors import ExportError

import adainfer.runtime as rt
from adainfer.exporter import quality
from adainfer.exporter.convert import convert_bundle

PRECISIONS = ("int4", "int8-weight", "fp16")


@pytest.fixture(scope="module")
def converted(smollm2_hf, smollm2_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-quant")
    # convert_bundle raises ExportError when a conversion fails its structural or quality check
    return {p: (root / p, convert_bundle(smollm2_hf, smollm2_bundle, root / p, p)) for p in PRECISIONS}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_smollm2_precision_passes_its_quality_check(converted, precision):
    out, manifest = converted[precision]
    measured = manifest.extras["quantization"]["quality"]
    min_agreement, max_ratio = quality.THRESHOLDS[precision]
    assert measured["text"] == "tinystories_heldout.txt" and measured["positions"] > 900
    assert measured["top1_agreement"] >= min_agreement and measured["perplexity_ratio"] <= max_ratio
    assert 5 < measured["fp32_perplexity"] < 10  # SmolLM2 on TinyStories: 7.38 measured
    assert rt.load(out).manifest.extras["quantization"] == manifest.extras["quantization"]


def test_smollm2_int4_keeps_the_gguf_weights(converted):
    """Q4_1 blocks -> 4-bit MatMulNBits (block 32, int8 compute) + block-minima term; the tied Q8_0
    embedding / LM head -> 8-bit (GatherBlockQuantized, MatMulNBits): top-1 agreement with float32 >= 0.95."""
    out, manifest = converted["int4"]
    info = manifest.extras["quantization"]
    assert (info["bits"], info["block_size"], info["accuracy_level"], info["quantize_heads"]) == (4, 32, 4, True)
    block = onnx.load(str(out / "block_00.onnx"))
    nbits = [{a.name: a.i for a in n.attribute} for n in block.graph.node if n.op_type == "MatMulNBits"]
    assert all((a["bits"], a["block_size"], a["accuracy_level"]) == (4, 32, 4) for a in nbits)
    # projections that read one input are fused as genai's builder does: qkv (576 -> 9*64 + 2*3*64), o, gate_up, down
    assert [(a["K"], a["N"]) for a in nbits] == [(576, 960), (576, 576), (576, 3072), (1536, 576)]
    ops = collections.Counter(n.op_type for n in block.graph.node)
    assert ops["ReduceSum"] >= 4  # block sums of each distinct input: attention input (q, k, v), o, gate/up, down
    assert sum(n.name.endswith("_gguf_offset") and n.op_type == "MatMul" for n in block.graph.node) == 4
    head = [{a.name: a.i for a in n.attribute} for n in onnx.load(str(out / "final_head.onnx")).graph.node
            if n.op_type == "MatMulNBits"]
    assert [a["bits"] for a in head] == [8]
    embed = [n for n in onnx.load(str(out / "embed.onnx")).graph.node if n.op_type == "GatherBlockQuantized"]
    assert [{a.name: a.i for a in n.attribute}["bits"] for n in embed] == [8]
    assert info["quality"]["top1_agreement"] >= 0.95


def test_smollm2_int4_answers_the_chat_question_as_fp32(converted, smollm2_bundle):
    out, _ = converted["int4"]
    fp32, int4 = rt.load(smollm2_bundle), rt.load(out)
    prompt = fp32.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    want = fp32.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    got = int4.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert "Paris" in want.text and got.tokens == want.tokens


def test_smollm2_int4_refined_head_keeps_the_choice_and_stores_the_table_once(converted, smollm2_hf, smollm2_bundle,
                                                                             tmp_path, monkeypatch):
    """`--head-refine 64` on int4: the 4-bit copy ranks, the 8-bit Q8_0 rows re-score; the 8-bit table is the
    embedding's (stored once, so the bundle shrinks by the 8-bit head less the 4-bit copy), agreement with float32
    stays >= 0.95 (measured 0.963), and the chat answer is float32's."""
    out = tmp_path / "int4-refine"
    manifest = convert_bundle(smollm2_hf, smollm2_bundle, out, "int4", head_refine=64)
    info = manifest.extras["quantization"]
    assert info["head_refine"] == 64 and info["quality"]["top1_agreement"] >= 0.95
    assert info["quality"]["perplexity_ratio"] < 1.02  # the tail's 4-bit logits (measured 1.010)
    head = onnx.load(str(out / "final_head.onnx"), load_external_data=False)
    nbits = [{a.name: a.i for a in n.attribute} for n in head.graph.node if n.op_type == "MatMulNBits"]
    assert [(a["bits"], a["N"]) for a in nbits] == [(4, 49152)]
    (top,) = [n for n in head.graph.node if n.op_type == "TopK"]
    (count,) = [t for t in head.graph.initializer if t.name == top.input[1]]
    assert onnx.numpy_helper.to_array(count).tolist() == [64]
    def table_location(path, op):
        model = onnx.load(str(path), load_external_data=False)
        (node,) = [n for n in model.graph.node if n.op_type == op]
        (t,) = [t for t in model.graph.initializer if t.name == node.input[0]]
        return {e.key: e.value for e in t.external_data}
    assert table_location(out / "final_head.onnx", "GatherBlockQuantized") == table_location(out / "embed.onnx",
                                                                                            "GatherBlockQuantized")
    int4_size = sum(f.stat().st_size for f in converted["int4"][0].iterdir())
    refined_size = sum(f.stat().st_size for f in out.iterdir())
    assert int4_size - refined_size > 10e6  # 31.9 MB of 8-bit head out, 16.0 MB of 4-bit copy in
    # the full step's twin re-scores in one adainfer.HeadRefine node, the standard graph's eight tail nodes gone
    from adainfer.runtime.q4_1_kernel import twin_key

    twin = onnx.load(str(out / manifest.attachments[twin_key("full_step")].file), load_external_data=False)
    ops = collections.Counter(n.op_type for n in twin.graph.node)
    assert ops["HeadRefine"] == 1 and not ops["TopK"] and not ops["ScatterElements"] and ops["GatherBlockQuantized"] == 1
    fp32, refined = rt.load(smollm2_bundle), rt.load(out)
    prompt = fp32.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    want = fp32.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert "full_step" in refined.sessions.fused
    assert refined.generate(prompt, max_new_tokens=8, stop_at_eos=False).tokens == want.tokens
    monkeypatch.setenv("ADAINFER_Q4_1_KERNEL", "0")  # the standard graphs: the twin's logits are theirs
    standard = rt.load(out)
    assert not standard.sessions.fused
    def step_logits(model) -> np.ndarray:  # the prompt's and 4 decode steps' logits
        state, logits = model.start([prompt])
        return np.array([logits[0]] + [model.step(state, [token])[0] for token in want.tokens[:4]])

    assert np.array_equal(step_logits(refined).argmax(-1), step_logits(standard).argmax(-1))  # (a tail logit may be capped in
    # one and re-scored in the other: the twin's Q4_1 sums move the coarse ranking's boundary a little)


def test_smollm2_int8_dynamic_is_refused_by_its_quality_check(smollm2_hf, smollm2_bundle, tmp_path):
    with pytest.raises(ExportError, match=r"quality check failed: int8-dynamic top-1 agreement with fp32 0\.[0-4]"):
        convert_bundle(smollm2_hf, smollm2_bundle, tmp_path / "int8-dynamic", "int8-dynamic")
    assert not (tmp_path / "int8-dynamic").exists()


def test_smollm2_int4_runs_its_q4_1_groups_in_the_fused_kernel(converted, smollm2_hf, monkeypatch, tmp_path):
    """Every merged graph of the int4 bundle has a twin whose 120 (full step) Q4_1 groups are one custom node each
    (each MLP's SwiGLU in its gate/up node, each residual Add in the next norm, no padding bias); on this CPU the runtime runs the twins, and the bundle still agrees with float32 (>= 0.95, as the standard
    graphs do: 0.963 / 0.973 measured) and answers the chat question; ADAINFER_Q4_1_KERNEL=0 runs the standard ones."""
    from adainfer.exporter.q4_1_twins import fuse_q4_1
    from adainfer.runtime.q4_1_kernel import cpu_is_fast, library, twin_file, twin_key

    out, manifest = converted["int4"]
    assert {k for k in manifest.attachments if k.startswith(twin_key(""))} == {twin_key(g) for g in manifest.merged_graphs}
    for graph in manifest.merged_graphs:
        assert manifest.attachments[twin_key(graph)].file == twin_file(graph, manifest.graphs[graph].sha256)
    twin = onnx.load(str(out / manifest.attachments[twin_key("full_step")].file), load_external_data=False)
    standard = collections.Counter(n.op_type for n in onnx.load(str(out / "full_step.onnx"), load_external_data=False).graph.node)
    ops = collections.Counter(n.op_type for n in twin.graph.node)
    groups = 4 * manifest.num_layers  # q/k/v, o, gate/up, down per block
    assert ops["MatMulQ4_1"] == groups and ops["MatMulNBits"] == standard["MatMulNBits"] - groups
    assert ops["ReduceSum"] == standard["ReduceSum"] - groups and fuse_q4_1(twin)[1] == 0  # block sums gone
    swiglu = [n for n in twin.graph.node if n.op_type == "MatMulQ4_1" and any(a.name == "swiglu" and a.i == 1 for a in n.attribute)]
    assert len(swiglu) == manifest.num_layers and ops["Split"] == standard["Split"] - manifest.num_layers  # each MLP's
    assert ops["Sigmoid"] == standard["Sigmoid"] - manifest.num_layers  # SwiGLU is in its gate/up node
    # every block's input norm but the first (it reads the embedding) takes in the residual Add before it
    skip = ops["SkipSimplifiedLayerNormalization"] - standard["SkipSimplifiedLayerNormalization"]
    assert skip == manifest.num_layers - 1 and ops["Pow"] == standard["Pow"] - skip
    # a merged graph runs unpadded batches only: the twin's attention has no padding bias (the standard's has)
    attention = [n for n in twin.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == manifest.num_layers and all(len(n.input) <= 10 for n in attention)
    assert standard["Unsqueeze"] > ops["Unsqueeze"]  # the bias's own nodes are gone
    assert cpu_is_fast() and library() is not None  # CI's machine: AVX2, a C compiler
    fused = rt.load(out)
    prompt = fused.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    answer = fused.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert "full_step" in fused.sessions.fused and "Paris" in answer.text
    sequences = quality.held_out_sequences(out / "tokenizer.json", manifest.vocab_size, manifest.bos_token_id)
    measured = quality.measure(out, sequences, quality.torch_reference(smollm2_hf, sequences))
    assert measured["top1_agreement"] >= 0.95 and measured["perplexity_ratio"] <= 1.03
    # a twin whose name does not carry its graph's digest (left by a graph written again) is never run
    stale = tmp_path / "stale"
    shutil.copytree(out, stale)
    old = manifest.attachments[twin_key("full_step")].file
    os.rename(stale / old, stale / f"full_step.q4_1.{'0' * 16}.onnx")
    manifest.attach(twin_key("full_step"), stale, f"full_step.q4_1.{'0' * 16}.onnx").save(stale)
    assert "full_step" not in rt.load(stale).sessions.fused
    monkeypatch.setenv("ADAINFER_Q4_1_KERNEL", "0")
    assert not rt.load(out).sessions.fused
