"""The fast chain: fused Llama blocks, weights shared between graphs and stored once, lazy
sessions, ONNX Runtime's global thread pool. Equality with transformers for every family is
tests/test_families.py (padded batch + 16 cached decode steps); early exit, kv fill and
speculative rollback are tests/test_generation.py and tests/test_calib.py."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import adainfer.runtime as rt
from adainfer.exporter import export_model
from adainfer.exporter.shared_weights import SHARED_FILE, share_weights
from conftest import ROOT, tiny_config, tiny_model

TOL = 1e-4


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _external(path) -> dict[str, tuple[str, int, int]]:
    """initializer name -> (location, offset, length) of the graph's external tensors."""
    out = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return out


def tied_llama():
    """A tiny Llama whose LM head is its embedding table (as SmolLM2's)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = tied_llama()
    out = tmp_path_factory.mktemp("tied") / "bundle"
    return model, out, export_model(model, out)


def test_llama_blocks_use_fused_operators_other_layouts_do_not(tmp_path):
    export_model(tiny_model("llama"), tmp_path / "llama")
    ops = _ops(tmp_path / "llama" / "block_00.onnx")
    assert ops["GroupQueryAttention"] == 1 and ops["RotaryEmbedding"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 1
    assert ops["MatMul"] == 7  # q, k, v, o, gate, up, down: nothing else multiplies
    export_model(tiny_model("mistral"), tmp_path / "mistral")  # sliding window: the traced torch block
    assert _ops(tmp_path / "mistral" / "block_00.onnx")["GroupQueryAttention"] == 0


def _inline_bytes(path) -> int:
    """Bytes of the tensors a graph file holds itself (not in external data)."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(len(t.raw_data) for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)


def test_tied_table_is_stored_once_and_logits_equal_transformers(tied):
    model, bundle, manifest = tied
    table = model.model.embed_tokens.weight.detach().numpy()
    assert manifest.files["shared_weights"].file == SHARED_FILE
    refs = {g: _external(bundle / f"{g}.onnx") for g in ("embed", "exit_head", "final_head")}
    places = {ref for g in refs.values() for ref in g.values() if ref[2] == table.nbytes}
    assert len(places) == 1, refs  # all three graphs point at the same bytes
    (location, offset, length), = places
    data = (bundle / SHARED_FILE).read_bytes()
    assert data[offset:offset + length] == table.astype(np.float32).tobytes()
    assert data.count(table[:4].astype(np.float32).tobytes()) == 1  # the table's first rows appear once
    assert _ops(bundle / "final_head.onnx")["Gemm"] == 1 and _ops(bundle / "final_head.onnx")["MatMul"] == 0
    # the bundle is about its parameters: 1 table + 3 blocks (+ graph structure), not 3 tables
    params = sum(p.numel() * 4 for p in model.parameters())
    spans = {manifest.graphs[g].file for g in manifest.spans.values()}
    merged = {manifest.graphs[g].file for g in manifest.merged_graphs}  # the spans and the full step
    total = sum((bundle / s.file).stat().st_size for s in manifest.all_files().values() if s.file not in merged)
    assert total < params + table.nbytes / 2, (total, params)
    # the full-depth span holds its blocks' graph structure and small inline tensors, no weights of its own: its
    # inline tensors are the blocks' plus the fused projections' split widths, its size the blocks' plus names
    # (prefixes; the Concat / MatMul / Split of the fused projections, ~2 KB a block)
    blocks = sum((bundle / manifest.graphs[b].file).stat().st_size for b in manifest.block_names)
    names = 4096 + 2048 * manifest.num_layers
    assert spans == {"span_00_02.onnx"} and (bundle / "span_00_02.onnx").stat().st_size < blocks + names
    assert _inline_bytes(bundle / "span_00_02.onnx") <= sum(
        _inline_bytes(bundle / manifest.graphs[b].file) for b in manifest.block_names) + 64 * manifest.num_layers
    # so does the full step (embedding, span and head): the tied table once, where the other graphs have it
    size = {g: (bundle / manifest.graphs[g].file).stat().st_size for g in ("embed", "final_head", "full_step")}
    assert size["full_step"] < blocks + size["embed"] + size["final_head"] + names, size

    runtime = rt.load(bundle)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, size=7).tolist(), rng.integers(3, 512, size=4).tolist()]
    got = runtime.last_logits(prompts)
    for row, ids in enumerate(prompts):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.max(np.abs(got[row] - want)) < TOL
    hidden = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert runtime.exit_features(hidden)[0].tolist() == runtime.final_logits(hidden).argmax(-1).tolist()


def test_block_and_kv_fill_share_their_key_value_projections(tied):
    _, bundle, _ = tied
    block, fill = _external(bundle / "block_01.onnx"), _external(bundle / "kv_fill_01.onnx")
    assert len(fill) == 2 and set(fill.values()) <= set(block.values())
    assert {loc for loc, _, _ in fill.values()} == {SHARED_FILE}


def test_sharing_again_changes_nothing(tied, tmp_path):
    import shutil

    _, bundle, manifest = tied
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    share_weights(copy, [g.file for g in manifest.graphs.values()], 1 << 30)
    for name in [SHARED_FILE] + [g.file for g in manifest.graphs.values()]:
        assert hashlib.sha256((copy / name).read_bytes()).digest() == hashlib.sha256((bundle / name).read_bytes()).digest(), name


def test_untied_model_shares_only_what_is_identical(tmp_path):
    model = tiny_model("llama")  # lm_head is its own matrix
    manifest = export_model(model, tmp_path / "b")
    assert _ops(tmp_path / "b" / "final_head.onnx")["Gemm"] == 0  # nothing to tie: the traced MatMul stays
    table = model.model.embed_tokens.weight.detach().numpy()
    head = model.lm_head.weight.detach().numpy()
    embed_refs = [ref for ref in _external(tmp_path / "b" / "embed.onnx").values() if ref[2] == table.nbytes]
    head_refs = [ref for ref in _external(tmp_path / "b" / "final_head.onnx").values() if ref[2] == head.nbytes]
    # the embedding (shared with the full step) and the LM head each once, at different places
    assert len(embed_refs) == 1 and embed_refs != head_refs
    data = (tmp_path / "b" / SHARED_FILE).read_bytes()
    assert data.count(table[:2].astype(np.float32).tobytes()) == 1
    assert "shared_weights" in manifest.files  # blocks and kv fills still share K/V projections


def test_exit_head_and_kv_fill_sessions_are_created_on_first_use(stories_bundle):
    model = rt.load(stories_bundle)
    loaded = set(model.sessions.loaded())
    # the full step runs every full-depth pass: every other graph (span, blocks, heads) is loaded on first use only
    assert loaded == {"full_step"}
    assert not any(name.startswith("kv_fill_") for name in loaded)
    model.generate("Once upon a time", max_new_tokens=4)
    assert "exit_head" not in model.sessions.loaded()
    hidden = np.zeros((1, model.manifest.hidden_size), np.float32)
    model.exit_features(hidden)
    assert "exit_head" in model.sessions.loaded() and "kv_fill_00" in model.sessions


GLOBAL_POOL_SCRIPT = """
import sys
from adainfer.runtime import load
from adainfer.runtime.sessions import use_global_thread_pool, global_thread_pool
assert use_global_thread_pool(2) is True and global_thread_pool() == 2
model = load(sys.argv[1])
print(model.generate("Once upon a time", max_new_tokens=12).tokens)
assert use_global_thread_pool(1) is False  # fixed for the process
"""

LATE_POOL_SCRIPT = """
import sys
from adainfer.runtime import load
from adainfer.runtime.sessions import use_global_thread_pool, global_thread_pool
model = load(sys.argv[1])
assert use_global_thread_pool(2) is False and global_thread_pool() is None  # sessions exist: refused
print(model.generate("Once upon a time", max_new_tokens=12).tokens)
"""


def test_global_thread_pool_gives_the_same_tokens(stories_bundle):
    want = rt.load(stories_bundle).generate("Once upon a time", max_new_tokens=12).tokens
    for script in (GLOBAL_POOL_SCRIPT, LATE_POOL_SCRIPT):
        proc = subprocess.run([sys.executable, "-c", script, str(stories_bundle)], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-500:]
        assert proc.stdout.strip().splitlines()[-1] == str(want)
