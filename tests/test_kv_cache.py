"""`--kv int8`: an int8 KV cache in the fused block graphs (static scales), on stories260K and tiny models.

The round trip: the int8 block, fed an int8 past, must store exactly the encoding (`kv_cache.quantize`) of
the keys and values the float32 block computes for the same tokens, so that each cache entry, dequantized,
is within half a quantization step (scale / 2) of the float32 cache; its hidden states must equal the float
block's run on the dequantized past within `HIDDEN_TOLERANCE`. The runtime keeps the int8 cache through early exit (kv_fill graphs) and
speculative rollback (greedy speculative == greedy full depth, as with a float cache).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest

import adainfer.runtime as rt
from adainfer.errors import BundleError, ExportError
from adainfer.exporter import export, export_model
from adainfer.exporter import kv_cache
from adainfer.manifest import Manifest
from adainfer.paths import DEFAULT_MODEL_DIR
from adainfer.runtime.exit_policy import ExitPolicy
from conftest import run_cli, tiny_model

PROMPTS = ["Once upon a time", "The cat sat on the mat.", "Lily and Ben went to the park", "One day, a little bird",
           "Tom was sad because"]
#: hidden states of the int8 block vs the float32 block run on the dequantized past (same inputs otherwise); the
#: int8 kernel also attends over the new token's own quantized key and value, the float block over the exact ones
#: (measured on stories260K with a random int8 past: at most 1.1e-2 over its 5 layers, hidden states of size ~1-4;
#: a past read with the wrong scale is off by ~1)
HIDDEN_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv8")
    export(DEFAULT_MODEL_DIR, root / "fp32", progress=False)
    export(DEFAULT_MODEL_DIR, root / "int8", progress=False, kv="int8")
    return root / "fp32", root / "int8"


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_manifest_records_the_int8_cache(bundles):
    fp32, int8 = bundles
    manifest = Manifest.load(int8)
    kv = manifest.kv_cache
    assert (kv.dtype, kv.scaling, kv.margin) == ("int8", "per-channel", kv_cache.DEFAULT_MARGIN)
    per_token = 2 * manifest.num_layers * manifest.num_kv_heads * manifest.head_dim
    assert (kv.bytes_per_token, kv.float32_bytes_per_token) == (per_token, 4 * per_token)
    assert kv.scale_bytes == 2 * manifest.num_layers * manifest.num_kv_heads * manifest.head_dim * 4
    assert kv.quality["perplexity_ratio"] <= kv_cache.THRESHOLDS[1] and kv.quality["top1_agreement"] >= kv_cache.THRESHOLDS[0]
    for name in manifest.block_names:
        specs = {t.name: t.dtype for t in [*manifest.graphs[name].inputs, *manifest.graphs[name].outputs]}
        assert [specs[n] for n in ("past_key", "past_value", "present_key", "present_value")] == ["int8"] * 4
        assert specs["hidden_states"] == "float32"
    assert manifest.kv_dtype == "int8" and Manifest.load(fp32).kv_dtype == "float32"
    assert "kv_cache" not in json.loads((fp32 / "manifest.json").read_text())  # float32 bundles are unchanged
    state, _ = rt.load(int8).start([[1, 403, 407]])
    assert state.keys[0].dtype == np.int8 and state.values[-1].dtype == np.int8


def test_int8_cache_round_trip_against_the_float_cache(bundles):
    fp32, int8 = bundles
    manifest = Manifest.load(int8)
    rng = np.random.default_rng(0)
    heads, dim, past, new = manifest.num_kv_heads, manifest.head_dim, 6, 1
    for layer in range(manifest.num_layers):
        k_scale, v_scale = kv_cache.block_scales(int8 / f"block_{layer:02d}.onnx")
        assert k_scale.shape == v_scale.shape == (heads, 1, dim)
        past_key = rng.integers(-100, 100, size=(1, heads, past, dim)).astype(np.int8)
        past_value = rng.integers(-100, 100, size=(1, heads, past, dim)).astype(np.int8)
        feeds = {"hidden_states": rng.standard_normal((1, new, manifest.hidden_size)).astype(np.float32),
                 "position_ids": np.array([[past]], np.int64), "attention_mask": np.ones((1, past + new), np.int64)}
        h8, key8, value8 = _session(int8 / f"block_{layer:02d}.onnx").run(
            None, {**feeds, "past_key": past_key, "past_value": past_value})
        h32, key32, value32 = _session(fp32 / f"block_{layer:02d}.onnx").run(
            None, {**feeds, "past_key": kv_cache.dequantize(past_key, k_scale),
                   "past_value": kv_cache.dequantize(past_value, v_scale)})
        assert key8.dtype == value8.dtype == np.int8
        assert np.array_equal(key8[:, :, :past], past_key) and np.array_equal(value8[:, :, :past], past_value)
        # the new token's entries: exactly the encoding of the float cache's, so within scale / 2 of it
        assert np.array_equal(key8[:, :, past:], kv_cache.quantize(key32[:, :, past:], k_scale))
        assert np.array_equal(value8[:, :, past:], kv_cache.quantize(value32[:, :, past:], v_scale))
        for q, f, s in ((key8, key32, k_scale), (value8, value32, v_scale)):
            inside = np.abs(f[:, :, past:]) <= 127 * s  # not saturated
            err = np.abs(kv_cache.dequantize(q[:, :, past:], s) - f[:, :, past:])
            assert np.all(err[inside] <= np.broadcast_to(s / 2, err.shape)[inside] * (1 + 1e-5))
        assert np.abs(h8 - h32).max() <= HIDDEN_TOLERANCE


def test_kv_fill_writes_the_blocks_encoding(bundles):
    _, int8 = bundles
    manifest = Manifest.load(int8)
    assert kv_cache.check_fill_matches_block(int8, manifest, seed=3) == manifest.num_layers
    rng = np.random.default_rng(1)
    hidden = (4 * rng.standard_normal((1, 4, manifest.hidden_size))).astype(np.float32)  # some entries saturate
    positions = np.arange(4, dtype=np.int64)[None]
    empty = np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), np.int8)
    for layer in range(manifest.num_layers):
        _, key, value = _session(int8 / f"block_{layer:02d}.onnx").run(None, {
            "hidden_states": hidden, "position_ids": positions, "attention_mask": np.ones((1, 4), np.int64),
            "past_key": empty, "past_value": empty})
        fill_key, fill_value = _session(int8 / f"kv_fill_{layer:02d}.onnx").run(
            None, {"hidden_states": hidden, "position_ids": positions})
        assert fill_key.dtype == np.int8 and np.array_equal(fill_key, key) and np.array_equal(fill_value, value)


def test_generation_modes_with_an_int8_cache(bundles):
    fp32, int8 = bundles
    model, reference = rt.load(int8), rt.load(fp32)
    rejected = agree = agree_early = 0
    for prompt in PROMPTS:
        full = model.generate(prompt, max_new_tokens=24)
        agree += full.tokens == reference.generate(prompt, max_new_tokens=24).tokens
        spec = model.generate(prompt, max_new_tokens=24, mode="speculative", policy=ExitPolicy.rule(0.2))
        assert spec.tokens == full.tokens, prompt  # lossless: rollback of the int8 cache works
        rejected += spec.rejected_rounds
        early = model.generate(prompt, max_new_tokens=12, mode="early-exit", policy=ExitPolicy.forced(2))
        assert early.layers_per_token[1:] == [2] * 11  # the prompt runs at full depth, then kv_fill writes int8 rows
        agree_early += early.tokens == reference.generate(prompt, max_new_tokens=12, mode="early-exit",
                                                          policy=ExitPolicy.forced(2)).tokens
    assert rejected >= 1
    assert agree == agree_early == len(PROMPTS)  # stories260K: the int8 cache keeps the float32 greedy text


def test_the_int8_full_step_appends_in_place_as_the_int8_blocks_do(bundles):
    """An int8-KV bundle has a full step too (merged from its int8-cache blocks); the cpu backend runs it with
    the int8 cache appended in place (GroupQueryAttention writes it), and gets the blocks' logits and cache."""
    _, int8 = bundles
    m = Manifest.load(int8)
    assert "full_step" in m.graphs
    fast, plain = rt.load(int8, threads=1), rt.load(int8, threads=1, spans=False)
    assert fast.backend.in_place and not plain.backend.runs_full_step
    ids = fast.tokenizer.encode(PROMPTS[0])
    (state_a, logits_a), (state_b, logits_b) = fast.start([ids]), plain.start([ids])
    for step in range(12):
        assert np.abs(logits_a - logits_b).max() <= 1e-4, step
        token = int(logits_b[0].argmax())
        logits_a, logits_b = fast.step(state_a, [token]), plain.step(state_b, [token])
    assert state_a.in_place is not None and fast.session_calls["full_step"] == 13
    for layer in range(fast.num_layers):
        (ka, va), (kb, vb) = state_a.layer(layer), state_b.layer(layer)
        assert ka.dtype == va.dtype == np.int8 and ka.shape == kb.shape == (1, m.num_kv_heads, len(ids) + 12, m.head_dim)
        # one graph or five may round a key differently by one ulp before the encoding: at most one step apart
        assert np.abs(ka.astype(np.int16) - kb).max() <= 1 and np.abs(va.astype(np.int16) - vb).max() <= 1
        assert (ka != kb).mean() <= 0.01 and (va != vb).mean() <= 0.01


def test_generic_blocks_and_unfused_families_refuse_an_int8_cache(tmp_path):
    with pytest.raises(ExportError, match="--generic-blocks keeps a float32 cache"):
        export(DEFAULT_MODEL_DIR, tmp_path / "a", kv="int8", fused=False, progress=False)
    with pytest.raises(ExportError, match="needs fused Llama-layout blocks"):
        export_model(tiny_model("gpt2"), tmp_path / "b", kv="int8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    code, _, stderr = run_cli("adainfer-export", "-o", str(tmp_path / "c"), "--kv", "int8", "--generic-blocks", "--no-calib")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "float32 cache" in stderr


def test_manifest_refuses_a_cache_dtype_that_disagrees_with_the_graphs(bundles):
    fp32, int8 = bundles
    manifest = Manifest.load(int8)
    data = manifest.to_dict()
    del data["kv_cache"]
    with pytest.raises(BundleError, match="past_key is int8, the KV cache is float32"):
        Manifest.from_dict(data)
    data = Manifest.load(fp32).to_dict()
    data["kv_cache"] = dataclasses.asdict(manifest.kv_cache)
    with pytest.raises(BundleError, match="past_key is float32, the KV cache is int8"):
        Manifest.from_dict(data)
    data = manifest.to_dict()
    data["kv_cache"]["scaling"] = "per-token"
    with pytest.raises(BundleError, match="kv_cache.scaling"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_quantized_weights_with_an_int8_cache_pass_their_checks(precision, tmp_path, bundles):
    """The weight conversion runs after the cache's: its structural check feeds the int8 graphs their encoding."""
    _, int8 = bundles
    manifest = export(DEFAULT_MODEL_DIR, tmp_path / precision, progress=False, kv="int8", precision=precision)
    assert manifest.kv_cache.dtype == "int8" and manifest.extras["quantization"]["quality"]["top1_agreement"] > 0.8
    assert all(manifest.graphs[n].precision == precision for n in manifest.block_names)
    assert np.array_equal(kv_cache.block_scales(tmp_path / precision / "block_00.onnx")[0],
                          kv_cache.block_scales(int8 / "block_00.onnx")[0])  # the same calibration
    model = rt.load(tmp_path / precision)
    assert model.generate("Once upon a time", max_new_tokens=8, mode="early-exit", policy=ExitPolicy.forced(2)).tokens
