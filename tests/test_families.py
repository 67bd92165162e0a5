"""Every family against transformers: padded batch prefill, then 16 cached decode steps (1e-4)."""

import numpy as np
import onnx
import pytest
import torch

import adainfer.runtime as rt
from adainfer.exporter import export_model
from conftest import tiny_model

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt", "opt-postnorm"]
TOL = 1e-4


def _hf_step(model, ids, mask, positions, past):
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions),
                past_key_values=past, use_cache=True)
    return out.logits[:, -1].float().numpy(), out.past_key_values


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers_with_cache(family, tmp_path):
    model = tiny_model(family)
    export_model(model, tmp_path / "bundle")
    runtime = rt.load(tmp_path / "bundle")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 512, size=9).tolist(), rng.integers(3, 512, size=5).tolist()]

    state, got = runtime.start(prompts)
    # the same left-padded batch through transformers, with the runtime's position ids
    width = 9
    ids = [[0] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        want, past = _hf_step(model, ids, mask, positions, None)
    assert np.max(np.abs(got - want)) < TOL

    next_pos = np.array([len(p) for p in prompts])
    for step in range(16):
        tokens = got.argmax(-1).tolist()
        got = runtime.step(state, tokens)
        mask = [row + [1] for row in mask]
        with torch.no_grad():
            want, past = _hf_step(model, [[t] for t in tokens], mask, next_pos[:, None], past)
        next_pos = next_pos + 1
        assert np.max(np.abs(got - want)) < TOL, f"{family} step {step}"
    assert state.keys[0].shape == (2, runtime.manifest.num_kv_heads, width + 16, runtime.manifest.head_dim)


def test_gqa_geometry_recorded(tmp_path):
    manifest = export_model(tiny_model("llama"), tmp_path / "b")
    assert (manifest.num_heads, manifest.num_kv_heads) == (8, 2)
    block = manifest.graphs["block_00"]
    assert [i.name for i in block.inputs] == ["hidden_states", "position_ids", "attention_mask", "past_key", "past_value"]
    assert block.inputs[3].shape == ["batch", 2, "past_length", 8]
    assert [o.name for o in block.outputs] == ["hidden_states_out", "present_key", "present_value"]


def test_external_data_for_large_graphs(tmp_path):
    model = tiny_model("llama")
    manifest = export_model(model, tmp_path / "b", external_data_threshold=0)
    for name in ["block_00", manifest.spans[(0, manifest.num_layers - 1)]]:
        spec = manifest.graphs[name]
        assert [d.file for d in spec.data_files] == [f"{name}.onnx.data"]
    # the embedding table is also the full step's: stored once, in the shared file both reference
    table = model.model.embed_tokens.weight.detach().numpy().astype(np.float32)
    assert manifest.graphs["embed"].data_files == []
    assert (tmp_path / "b" / "shared_weights.bin").read_bytes().count(table.tobytes()) == 1
    # a block's large weights are also the full-depth span's: stored once, in the shared file both reference
    locations = {e.value for t in onnx.load(str(tmp_path / "b" / "block_00.onnx"), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"block_00.onnx.data", "shared_weights.bin"}
    # the LM head both heads hold is stored once, in the shared file (exporter/shared_weights.py)
    assert manifest.graphs["exit_head"].data_files == [] and "shared_weights" in manifest.files
    runtime = rt.load(tmp_path / "b")
    ids = [[5, 6, 7, 8]]
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits[0, -1].numpy()
    assert np.max(np.abs(runtime.last_logits(ids)[0] - want)) < TOL
