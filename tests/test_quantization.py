"""Quantized bundles: the ops in the graphs, their size, the manifest, and the runtime on them."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest

import adainfer.runtime as rt
from adainfer.errors import AdainferError, ExportError
from adainfer.exporter import export_model, quantize
from conftest import STORIES_DIR, run_cli, tiny_model

FLOAT = onnx.TensorProto.FLOAT


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _io_types(path) -> dict[str, int]:
    graph = onnx.load(str(path)).graph
    return {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}


def _float_weight_matmuls(path) -> int:
    """MatMuls that still multiply by a float32 weight initializer."""
    model = onnx.load(str(path))
    return len([n for n in quantize.weight_nodes(model) if n.op_type == "MatMul"])


@pytest.fixture(scope="module")
def bundles(stories_hf, tmp_path_factory):
    """stories260K at each precision: blocks only, except int8-weight which also converts the heads.

    Only int8-dynamic (the loosest) is verified at export, to keep the suite fast; the others are
    compared with the float32 bundle by the tests below.
    """
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for precision, heads, verify in [("fp16", False, False), ("int8-dynamic", False, True), ("int8-weight", True, False)]:
        out[precision] = root / precision
        export_model(stories_hf, out[precision], model_dir=STORIES_DIR, precision=precision, quantize_heads=heads,
                     verify=verify)
    return out


def test_int8_dynamic_graphs_hold_integer_matmuls(bundles, stories_bundle):
    block = bundles["int8-dynamic"] / "block_00.onnx"
    ops = _ops(block)
    # q, k, v, o, gate, up, down: the seven Linear layers (MatMul on transposed weights) are quantized
    assert ops["MatMulInteger"] == 7 and ops["DynamicQuantizeLinear"] >= 1
    assert _float_weight_matmuls(block) == 0
    # attention (scores, weights x values) runs inside the fused GroupQueryAttention, in float32
    assert ops["MatMul"] == 0 and ops["GroupQueryAttention"] == 1
    weights = {t.name: t for t in onnx.load(str(block)).graph.initializer}
    scales = [t for name, t in weights.items() if name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] > 1]
    assert len(scales) == 7  # one scale per output channel
    assert all(t == FLOAT for t in _io_types(block).values() if t != onnx.TensorProto.INT64)
    assert _io_types(block) == _io_types(stories_bundle / "block_00.onnx")
    assert _ops(bundles["int8-dynamic"] / "final_head.onnx") == _ops(stories_bundle / "final_head.onnx")  # heads untouched
    kv_fill = bundles["int8-dynamic"] / "kv_fill_00.onnx"  # norm + K and V projections: two weight MatMuls
    assert _ops(kv_fill)["MatMulInteger"] == 2 and _float_weight_matmuls(kv_fill) == 0
    assert _io_types(kv_fill) == _io_types(stories_bundle / "kv_fill_00.onnx")


def test_int8_weight_graphs_hold_8bit_matmulnbits(bundles, stories_bundle):
    for name in ["block_00.onnx", "kv_fill_04.onnx", "exit_head.onnx", "final_head.onnx"]:
        model = onnx.load(str(bundles["int8-weight"] / name))
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits"), name
        assert _float_weight_matmuls(bundles["int8-weight"] / name) == 0
        assert _io_types(bundles["int8-weight"] / name) == _io_types(stories_bundle / name)
    embed = onnx.load(str(bundles["int8-weight"] / "embed.onnx"))
    assert {t.data_type for t in embed.graph.initializer if len(t.dims) == 2} <= {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    assert "DequantizeLinear" in {n.op_type for n in embed.graph.node}


def test_fp16_keeps_norms_softmax_and_residuals_in_float32(bundles):
    model = onnx.load(str(bundles["fp16"] / "block_00.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    half_consumers = collections.Counter()
    for node in model.graph.node:
        for name in node.input:
            src = producers.get(name)
            if src is not None and src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT16:
                half_consumers[node.op_type] += 1
    assert set(half_consumers) == {"MatMul"} and half_consumers["MatMul"] == 7
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits["input_layernorm.weight"] == FLOAT and inits["post_attention_layernorm.weight"] == FLOAT
    assert sum(t == onnx.TensorProto.FLOAT16 for t in inits.values()) == 7
    kv_fill = onnx.load(str(bundles["fp16"] / "kv_fill_00.onnx"))
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in kv_fill.graph.initializer) == 2
    assert _float_weight_matmuls(bundles["fp16"] / "kv_fill_00.onnx") == 0


def test_fp16_logits_within_2e_2_of_fp32(bundles, stories_bundle, stories_tokenizer):
    prompts = [stories_tokenizer.encode(t).ids for t in ["Once upon a time", "Tom and his dog went to the park. They"]]
    want = rt.load(stories_bundle).last_logits(prompts)
    got = rt.load(bundles["fp16"]).last_logits(prompts)
    assert np.max(np.abs(got - want)) < 2e-2


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8-weight"])
def test_int8_greedy_generation_runs(bundles, stories_bundle, precision):
    want = rt.load(stories_bundle).generate("Once upon a time", max_new_tokens=24)
    got = rt.load(bundles[precision]).generate("Once upon a time", max_new_tokens=24)
    assert got.new_tokens == 24 and got.text.startswith("Once upon a time")
    assert got.tokens == want.tokens  # all 24 greedy tokens, as measured for both int8 precisions


#: kv_fill outputs against fp32 on random hidden states: max |error| / max(1, max |fp32|), measured
#: (fp16 2e-4, int8-weight 5.5e-3, int8-dynamic 0.20: activations quantized per call) with room; and the
#: greedy early-exit tokens (forced exit after block 3) that must equal fp32's, measured 12, 8, 8 of 12
KV_FILL = {"fp16": (1e-3, 12), "int8-weight": (0.015, 8), "int8-dynamic": (0.3, 8)}


@pytest.mark.parametrize("precision", ["fp16", "int8-dynamic", "int8-weight"])
def test_quantized_kv_fill_keeps_early_exit_generation_close(bundles, stories_bundle, precision):
    """A forced exit after 3 of 5 blocks fills the skipped layers' caches with the converted kv_fill graphs."""
    from adainfer.runtime.exit_policy import ExitPolicy

    tolerance, same_tokens = KV_FILL[precision]
    fp32, model = rt.load(stories_bundle), rt.load(bundles[precision])
    ids = model.encode("Once upon a time, there was a")
    hidden = np.random.default_rng(0).normal(size=(1, 4, model.manifest.hidden_size)).astype(np.float32)
    positions = np.arange(4, dtype=np.int64)[None, :]
    for layer in (1, 4):
        want = fp32.kv_fill(layer, hidden, positions)
        got = model.kv_fill(layer, hidden, positions)
        for g, w in zip(got, want):
            assert np.max(np.abs(g - w)) < tolerance * max(1.0, np.max(np.abs(w))), (layer, np.max(np.abs(g - w)))
    model.session_calls = {n: 0 for n in model.session_calls}
    out = model.generate(ids, max_new_tokens=12, mode="early-exit", policy=ExitPolicy.forced(3), stop_at_eos=False)
    assert out.new_tokens == 12 and model.session_calls["kv_fill_04"] > 0 and model.session_calls["block_04"] <= 1
    reference = fp32.generate(ids, max_new_tokens=12, mode="early-exit", policy=ExitPolicy.forced(3), stop_at_eos=False)
    assert out.tokens[:same_tokens] == reference.tokens[:same_tokens]


def test_manifest_records_precision_per_graph(bundles):
    for precision, heads in [("fp16", False), ("int8-dynamic", False), ("int8-weight", True)]:
        manifest = rt.load(bundles[precision]).manifest
        for name in manifest.block_names + [f"kv_fill_{i:02d}" for i in range(manifest.num_layers)]:
            assert manifest.graphs[name].precision == precision
        for name in ["embed", "exit_head", "final_head"]:
            assert manifest.graphs[name].precision == (precision if heads else "fp32")
        assert manifest.extras["quantization"]["precision"] == precision
        assert manifest.extras["quantization"]["verified"] is (precision == "int8-dynamic")


def test_block_weights_shrink_at_least_2_5x(tmp_path):
    """On a random Llama with hidden 256 (stories260K's 45K-weight blocks are dominated by graph overhead)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=256, max_position_embeddings=64)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    export_model(model, tmp_path / "fp32", verify=False)
    # the bundle keeps the K/V projections in shared_weights.bin (also used by kv_fill_00): compare
    # with the block written whole, as the converted ones are
    quantize.convert(tmp_path / "fp32" / "block_00.onnx", tmp_path / "block.fp32.onnx", "fp32")
    fp32 = (tmp_path / "block.fp32.onnx").stat().st_size
    for precision in ["int8-weight", "int8-dynamic"]:
        out = tmp_path / f"block.{precision}.onnx"
        quantize.convert(tmp_path / "fp32" / "block_00.onnx", out, precision)
        assert fp32 / out.stat().st_size >= 2.5, precision
    quantize.convert(tmp_path / "fp32" / "block_00.onnx", tmp_path / "block.fp16.onnx", "fp16")
    assert fp32 / (tmp_path / "block.fp16.onnx").stat().st_size >= 1.8


def test_stories260k_block_sizes(bundles, stories_bundle):
    """Reported as measured: the tiny blocks shrink less, graph structure is a fixed ~27 KB per block."""
    def inline_size(bundle):  # the block with its weights inline (they live in shared_weights.bin beside the span's)
        return onnx.load(str(bundle / "block_00.onnx")).ByteSize()

    fp32 = inline_size(stories_bundle)
    ratios = {p: fp32 / inline_size(bundles[p]) for p in bundles}
    assert ratios["int8-weight"] > 2.4 and ratios["int8-dynamic"] > 2.0 and ratios["fp16"] > 1.6


def test_unknown_precision_and_block_size_are_refused_before_work(stories_hf, tmp_path):
    with pytest.raises(ExportError, match="unknown precision 'int3'") as info:
        export_model(stories_hf, tmp_path / "b", precision="int3")
    assert isinstance(info.value, AdainferError) and "\n" not in str(info.value)
    with pytest.raises(ExportError, match="unsupported block size 48"):
        export_model(stories_hf, tmp_path / "b", precision="int4", block_size=48)
    assert not (tmp_path / "b").exists()
    code, _, err = run_cli("adainfer-export", "-o", str(tmp_path / "c"), "--precision", "int3")
    assert code == 2 and "invalid choice: 'int3'" in err and not (tmp_path / "c").exists()
    code, _, err = run_cli("adainfer-export", "-o", str(tmp_path / "c"), "--precision", "int4", "--block-size", "48")
    assert code == 2 and "invalid choice: 48" in err and not (tmp_path / "c").exists()


def _corrupt_block(path, how: str) -> None:
    """Damage one converted graph as a buggy conversion would: "scales" halves the scales of the MLP's down
    projection (the graph still runs, its outputs look plausible, its answers drift); "zero-kv" zeroes the key
    projection's scales (an output is gone). Projections that read one input are fused (q/k/v, gate/up): the key
    columns are the second part of the first node's Split."""
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    target = nodes[-1] if how == "scales" else nodes[0]  # qkv, o, gate_up, down: down is last, qkv first
    inits = {t.name: t for t in model.graph.initializer}
    scales = inits[target.input[2]]
    array = onnx.numpy_helper.to_array(scales)
    if how == "scales":
        array = 0.5 * array
    else:
        split = next(n for n in model.graph.node if n.op_type == "Split" and n.input[0] == target.output[0])
        q, k, _ = onnx.numpy_helper.to_array(inits[split.input[1]])
        array = array.reshape(q + k + _, -1).copy()
        array[q:q + k] = 0
        array = array.reshape(onnx.numpy_helper.to_array(scales).shape)
    scales.CopyFrom(onnx.numpy_helper.from_array(array, scales.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("how, refusal", [("scales", "quality check failed: int8-weight top-1 agreement"),
                                          ("zero-kv", "verification failed: block_01 present_key differs")])
def test_a_broken_conversion_is_refused_and_leaves_no_bundle(stories_hf, tmp_path, monkeypatch, how, refusal):
    """The same conversion passes untouched; with one block damaged it is refused: by the quality check on
    held-out text when the graph still runs plausibly, by the structural check when an output is gone."""
    manifest = export_model(stories_hf, tmp_path / "ok", model_dir=STORIES_DIR, precision="int8-weight")
    quality = manifest.extras["quantization"]["quality"]
    assert quality["top1_agreement"] >= 0.95 and quality["perplexity_ratio"] <= 1.03
    original = quantize.convert

    def convert_then_damage(src, dst, precision, **kwargs):
        original(src, dst, precision, **kwargs)
        if Path(dst).name == "block_01.onnx":
            _corrupt_block(dst, how)

    monkeypatch.setattr(quantize, "convert", convert_then_damage)
    with pytest.raises(ExportError, match=refusal) as info:
        export_model(stories_hf, tmp_path / "b", model_dir=STORIES_DIR, precision="int8-weight")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_int4_graphs_record_block_size_and_accuracy_level(stories_hf, tmp_path):
    """int4 = 4-bit MatMulNBits, symmetric, int8 compute (accuracy_level 4); the embedding and heads converted by
    default (GatherBlockQuantized / MatMulNBits); --block-size reaches the graphs and the manifest."""
    for block_size in (32, 16):
        out = tmp_path / f"int4-{block_size}"
        manifest = export_model(stories_hf, out, model_dir=STORIES_DIR, precision="int4", block_size=block_size,
                                verify=block_size == 32)
        info = manifest.extras["quantization"]
        assert (info["bits"], info["block_size"], info["accuracy_level"], info["symmetric"]) == (4, block_size, 4, True)
        assert info["quantize_heads"] is True
        for name in ["block_00.onnx", "kv_fill_03.onnx", "exit_head.onnx", "final_head.onnx"]:
            nbits = [n for n in onnx.load(str(out / name)).graph.node if n.op_type == "MatMulNBits"]
            attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
            assert nbits and all((a["bits"], a["block_size"], a["accuracy_level"]) == (4, block_size, 4) for a in attrs)
            assert _float_weight_matmuls(out / name) == 0
        # q/k/v and gate/up fused before quantizing (quantize.fuse_projections): qkv, o, gate_up, down
        assert len([n for n in onnx.load(str(out / "block_00.onnx")).graph.node if n.op_type == "MatMulNBits"]) == 4
        embed = [n for n in onnx.load(str(out / "embed.onnx")).graph.node if n.op_type == "GatherBlockQuantized"]
        assert len(embed) == 1 and {a.name: a.i for a in embed[0].attribute}["block_size"] == block_size
        assert all(manifest.graphs[g].precision == "int4" for g in ("embed", "block_00", "final_head"))
    measured = rt.load(tmp_path / "int4-32").manifest.extras["quantization"]["quality"]
    assert measured["positions"] > 900 and measured["text"] == "tinystories_heldout.txt"
    assert measured["top1_agreement"] >= 0.80 and measured["perplexity_ratio"] <= 1.20
    out = rt.load(tmp_path / "int4-32").generate("Once upon a time", max_new_tokens=8)
    assert out.new_tokens == 8 and out.text.startswith("Once upon a time")


def test_gpt2_gemm_is_quantized_too(tmp_path):
    """GPT-2's Conv1D exports as Gemm, which neither quantizer converts: it is rewritten as MatMul + Add first."""
    import onnxruntime as ort

    from adainfer.exporter.graphs import example_block_inputs

    manifest = export_model(tiny_model("gpt2"), tmp_path / "fp32", verify=False)
    src = tmp_path / "fp32" / "block_00.onnx"
    assert _ops(src)["Gemm"] == 4
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v.numpy() for k, v in example_block_inputs(manifest, batch=1, seq=4, past=2).items() if k in names}
    want = session.run(None, feeds)
    for precision, op in [("int8-weight", "MatMulNBits"), ("int8-dynamic", "MatMulInteger")]:
        out = tmp_path / f"{precision}.onnx"
        quantize.convert(src, out, precision)
        assert _ops(out)[op] == 4 and _ops(out)["Gemm"] == 0
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
        for g, w in zip(got, want):  # both quantize activations to int8 (per call / per block): relative RMS
            assert np.sqrt(np.mean((g - w) ** 2)) < 0.05 * np.sqrt(np.mean(w ** 2)), precision


# ----------------------------------------------------------------------------- early exit on quantized bundles


@pytest.fixture(scope="module")
def calibrated_pair(bundles, stories_bundle, tmp_path_factory):
    """An fp32 copy and an int8-weight copy (heads converted too) of stories260K, each calibrated on its own."""
    import shutil

    from adainfer.calib.calibrate import calibrate
    from adainfer.paths import DEFAULT_CALIB_DATA

    root = tmp_path_factory.mktemp("quant-calib")
    out = {}
    for name, src in [("fp32", stories_bundle), ("int8-weight", bundles["int8-weight"])]:
        out[name] = root / name
        shutil.copytree(src, out[name])
        # full-head: the folded decider extends the exit head, the case a transfer must rebuild on int8 heads
        out[name + "-report"] = calibrate(out[name], DEFAULT_CALIB_DATA, limit=16, progress=False, variant="full-head")
    return out


def test_calib_on_an_int8_bundle_trains_its_own_classifier(calibrated_pair):
    from adainfer.runtime.early_exit import load_policy

    bundle, report = calibrated_pair["int8-weight"], calibrated_pair["int8-weight-report"]
    model = rt.load(bundle)
    policy = load_policy(model)  # accepted: calibrated for this export's digest
    assert policy.extras["manifest_digest"] == model.manifest.digest() != rt.load(calibrated_pair["fp32"]).manifest.digest()
    assert "transferred_from" not in policy.extras
    assert report["chosen"]["agreement"] >= 0.99 and report["classifier_onnx"]
    assert model.manifest.graphs["exit_head"].precision == "int8-weight"
    out = model.generate("Once upon a time", max_new_tokens=16, mode="early-exit", stop_at_eos=False)
    assert out.new_tokens == 16


def test_reuse_policy_transfers_the_fp32_classifier(calibrated_pair, bundles, tmp_path):
    """The fp32 policy in the int8 bundle: destination digest, transferred_from, stale calib files gone,
    and the folded head rebuilt on the int8 exit head decides exactly as the copied classifier does."""
    import dataclasses
    import shutil

    from adainfer.calib.transfer import reuse_policy
    from adainfer.runtime.early_exit import ExitDecider, load_policy, trace

    src = calibrated_pair["fp32"]
    dst = tmp_path / "int8"
    shutil.copytree(calibrated_pair["int8-weight"], dst)
    src_policy = load_policy(rt.load(src))
    policy = reuse_policy(src, dst)
    model = rt.load(dst)
    assert load_policy(model) == policy
    assert policy.extras["manifest_digest"] == model.manifest.digest()
    assert policy.extras["transferred_from"] == rt.load(src).manifest.digest()
    assert policy.extras["refolded_on_destination_exit_head"] is (policy.decision == "folded")
    assert (policy.threshold, policy.features, policy.name) == (src_policy.threshold, src_policy.features, src_policy.name)
    assert (dst / "classifier.onnx").read_bytes() == (src / "classifier.onnx").read_bytes()
    assert "calib_report" not in model.manifest.attachments and not (dst / "calib_report.json").exists()
    assert not [k for k in model.manifest.attachments if k.startswith("plot_")]
    assert model.manifest.extras["exit_decision"] == policy.decision
    # the decider the runtime builds from the copied files against the copied classifier on int8 head features
    hidden = trace(model, model.encode("Once upon a time, there was a little girl"))
    as_classifier = ExitDecider(model, dataclasses.replace(policy, decision="classifier", head_file=None))
    as_written = ExitDecider(model, policy)
    for layer in range(1, model.num_layers):
        got = as_written.score(as_written.features(layer, hidden[layer], hidden[layer - 1]))
        want = as_classifier.score(as_classifier.features(layer, hidden[layer], hidden[layer - 1]))
        assert np.max(np.abs(got - want)) < 1e-4
    # generation with the written (folded) decider equals generation with the copied classifier, token
    # for token and exit for exit
    written = model.generate("Once upon a time", max_new_tokens=8, mode="early-exit", stop_at_eos=False)
    copied = model.generate("Once upon a time", max_new_tokens=8, mode="early-exit", stop_at_eos=False,
                            policy=as_classifier.policy)
    assert written.new_tokens == 8 and written.mode == "early-exit"
    assert (written.tokens, written.layers_per_token) == (copied.tokens, copied.layers_per_token)


def test_reuse_policy_cli_and_refusals(calibrated_pair, bundles, tmp_path):
    import json
    import shutil

    from adainfer.calib.transfer import reuse_policy
    from adainfer.runtime.early_exit import load_policy

    dst = tmp_path / "int8-dynamic"
    shutil.copytree(bundles["int8-dynamic"], dst)
    code, out, err = run_cli("adainfer", "calib", str(dst), "--reuse-policy", str(calibrated_pair["fp32"]), "--json")
    assert code == 0, err
    assert json.loads(out)["extras"]["refolded_on_destination_exit_head"] is False  # heads stay fp32 here
    assert load_policy(rt.load(dst)).extras["transferred_from"] == rt.load(calibrated_pair["fp32"]).manifest.digest()
    with pytest.raises(AdainferError, match="has no exit policy to reuse"):
        reuse_policy(bundles["fp16"], dst)
    shutil.copytree(calibrated_pair["fp32"], tmp_path / "fp32-copy")
    with pytest.raises(AdainferError, match="same export"):
        reuse_policy(calibrated_pair["fp32"], tmp_path / "fp32-copy")
    other = tmp_path / "tiny"
    export_model(tiny_model("llama"), other, verify=False)
    with pytest.raises(AdainferError, match="another model") as info:
        reuse_policy(calibrated_pair["fp32"], other)
    assert "\n" not in str(info.value)
    code, _, err = run_cli("adainfer", "calib", str(dst), "--reuse-policy", str(tmp_path / "missing"))
    assert code == 2 and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- weights already on a GGUF grid


def _matmul_graph(w: np.ndarray, rank: int = 3) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    shape_in, shape_out = (["b", "s", k], ["b", "s", n]) if rank == 3 else (["r", k], ["r", n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_gguf_q4_1_and_q8_0_weights_are_reencoded_exactly():
    """Weights on a Q4_1 grid (w = d*q + m per block of 32 along K) become 4-bit MatMulNBits + the block minima
    term and reproduce x @ W to float rounding (accuracy level 0); Q8_0 (w = d*q) becomes 8-bit MatMulNBits;
    weights on no grid are left alone (the quantizer rounds them)."""
    from adainfer.exporter.gguf_grid import encode_exact, q4_1_grid, q8_0_grid

    rng = np.random.default_rng(0)
    k, n = 128, 48
    d, m = rng.uniform(0.01, 0.05, (k // 32, 1, n)), rng.uniform(-0.4, -0.1, (k // 32, 1, n))
    q = rng.integers(0, 16, (k // 32, 32, n))
    q[:, 0, :], q[:, 1, :] = 0, 15  # every block spans its grid, as llama.cpp's Q4_1 blocks do
    w4 = (d * q + m).reshape(k, n).astype(np.float32)
    q8 = rng.integers(-127, 128, (k // 32, 32, n))
    q8[:, 0, :] = 127  # llama.cpp's Q8_0 scale is the block's largest magnitude / 127
    w8 = (rng.uniform(0.001, 0.01, (k // 32, 1, n)) * q8).reshape(k, n).astype(np.float32)
    noise = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    assert q4_1_grid(w4) is not None and q4_1_grid(noise) is None and q8_0_grid(noise) is None
    for w, op_bits in [(w4, 4), (w8, 8)]:
        for rank in (3, 2):
            x = rng.normal(size=(2, 5, k) if rank == 3 else (5, k)).astype(np.float32)
            model = _matmul_graph(w, rank)
            exact = encode_exact(model, list(model.graph.node), 32, accuracy_level=0)
            nbits = [nd for nd in exact.graph.node if nd.op_type == "MatMulNBits"]
            assert len(nbits) == 1 and {a.name: a.i for a in nbits[0].attribute}["bits"] == op_bits
            assert "W" not in {t.name for t in exact.graph.initializer}
            np.testing.assert_allclose(_run(exact, x), x @ w, atol=1e-4 * np.abs(x @ w).max())
    untouched = encode_exact(_matmul_graph(noise), list(_matmul_graph(noise).graph.node), 32, accuracy_level=4)
    assert [nd.op_type for nd in untouched.graph.node] == ["MatMul"]
    other_block = _matmul_graph(w4)
    assert [nd.op_type for nd in encode_exact(other_block, list(other_block.graph.node), 64, 4).graph.node] == ["MatMul"]


def test_int4_convert_uses_the_exact_encoding_on_grid_weights(tmp_path):
    """quantize.convert(..., "int4") on a Q4_1-grid MatMul: int8 compute (accuracy level 4), no second rounding:
    the error is the activations' int8 rounding only, far below round-to-nearest 4-bit."""
    rng = np.random.default_rng(1)
    k, n = 256, 64
    q = rng.integers(0, 16, (k // 32, 32, n))
    q[:, 0, :], q[:, 1, :] = 0, 15
    w = (rng.uniform(0.01, 0.05, (k // 32, 1, n)) * q + rng.uniform(-0.4, -0.1, (k // 32, 1, n))).reshape(k, n)
    src = tmp_path / "mm.onnx"
    onnx.save(_matmul_graph(w.astype(np.float32)), str(src))
    x = rng.normal(size=(1, 3, k)).astype(np.float32)
    want = x @ w.astype(np.float32)
    quantize.convert(src, tmp_path / "exact.onnx", "int4")
    nbits = [nd for nd in onnx.load(str(tmp_path / "exact.onnx")).graph.node if nd.op_type == "MatMulNBits"]
    assert [{a.name: a.i for a in nd.attribute}["accuracy_level"] for nd in nbits] == [4]
    exact_err = np.linalg.norm(_run(onnx.load(str(tmp_path / "exact.onnx")), x) - want) / np.linalg.norm(want)
    noisy = w + rng.normal(0, 1e-3, w.shape)  # off the grid: rounded to the nearest symmetric 4-bit value
    onnx.save(_matmul_graph(noisy.astype(np.float32)), str(src))
    quantize.convert(src, tmp_path / "rtn.onnx", "int4")
    rtn_err = np.linalg.norm(_run(onnx.load(str(tmp_path / "rtn.onnx")), x) - want) / np.linalg.norm(want)
    assert exact_err < 0.02 and rtn_err > 3 * exact_err, (exact_err, rtn_err)


def test_gguf_q8_0_embedding_table_becomes_gather_block_quantized():
    from onnx import TensorProto, helper, numpy_helper

    from adainfer.exporter.gguf_grid import encode_exact

    rng = np.random.default_rng(2)
    vocab, hidden = 50, 64
    q = rng.integers(-127, 128, (vocab, hidden // 32, 32))
    q[:, :, 0] = -127
    table = (rng.uniform(0.001, 0.01, (vocab, hidden // 32, 1)) * q).reshape(vocab, hidden).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["T", "ids"], ["y"], name="embed")], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", hidden])],
                              [numpy_helper.from_array(table, "T")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    exact = encode_exact(model, list(model.graph.node), 32, accuracy_level=4)
    (node,) = exact.graph.node
    assert node.op_type == "GatherBlockQuantized" and {a.name: a.i for a in node.attribute}["bits"] == 8
    import onnxruntime as ort

    ids = np.array([[0, 7, 49], [3, 3, 12]], dtype=np.int64)
    got = ort.InferenceSession(exact.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, table[ids], rtol=1e-6, atol=1e-7)
