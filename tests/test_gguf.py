"""GGUF files in: the header checks refuse what cannot be exported, in one line, before any work,
and the manifest's `source` record is validated like every other field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from adainfer.errors import BundleError, ExportError, UnsupportedModelError
from adainfer.exporter import gguf_source
from adainfer.manifest import Manifest, sha256_of


def _export_cli(capsys, *args):
    from adainfer.exporter.cli import main

    capsys.readouterr()
    rc = main([*args, "--quiet", "--no-verify"])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_refused(rc, out, err, *needles):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("adainfer-export: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_gguf(path: Path, arch: str, layers: int = 1) -> Path:
    """A small, well-formed GGUF file of architecture `arch` (one float32 tensor)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TINY_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def write_tiny_llama_gguf(path: Path, model, leave_out: tuple[str, ...] = ()) -> Path:
    """A float32 GGUF of a tiny random-weight `LlamaForCausalLM`, laid out as llama.cpp writes one
    (a character-level BPE tokenizer, a chat template); tensors named in `leave_out` are not written."""
    import gguf

    cfg = model.config
    vocab = cfg.vocab_size
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 161 + vocab)]
    # "<|endoftext|>" first, as SmolLM2 has it: transformers appends it to a gpt2-model vocabulary that lacks it
    writer.add_token_list(["<|endoftext|>", "<s>", "</s>"] + chars[:vocab - 3])
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(TINY_TEMPLATE)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    add_tensor = writer.add_tensor
    writer.add_tensor = lambda name, data: None if name in leave_out else add_tensor(name, data)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(g + "attn_norm.weight", sd[hf + "input_layernorm.weight"])
        writer.add_tensor(g + "attn_q.weight", _permute(sd[hf + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(g + "attn_k.weight", _permute(sd[hf + "self_attn.k_proj.weight"], kv_heads))
        writer.add_tensor(g + "attn_v.weight", sd[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(g + "attn_output.weight", sd[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(g + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(g + "ffn_gate.weight", sd[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(g + "ffn_up.weight", sd[hf + "mlp.up_proj.weight"])
        writer.add_tensor(g + "ffn_down.weight", sd[hf + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_round_trip_and_export(tmp_path, capsys):
    """Weights written as llama.cpp lays them out come back identical through `gguf_to_hf_dir`, and the
    bundle exported from the GGUF (a directory holding it) computes the original model's logits."""
    import torch

    import adainfer.runtime as rt
    from conftest import tiny_model

    model = tiny_model("llama")
    folder = tmp_path / "gguf"
    folder.mkdir()
    gguf_file = write_tiny_llama_gguf(folder / "tiny.gguf", model)

    hf_dir = gguf_source.gguf_to_hf_dir(gguf_file, tmp_path / "hf", progress=False)
    assert sorted(p.name for p in hf_dir.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                        "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_key_value_heads"] == 2
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"] == TINY_TEMPLATE
    from adainfer.exporter import load_model

    back = load_model(hf_dir).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(back[name], value), name

    rc, out, err = _export_cli_verified(capsys, str(folder), "-o", str(tmp_path / "bundle"))
    assert rc == 0, err
    bundle = tmp_path / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"] == {"format": "gguf", "file": "tiny.gguf", "size": gguf_file.stat().st_size,
                                  "sha256": sha256_of(gguf_file), "quantization": "ALL_F32"}
    ids = [1, 40, 7, 300, 12, 5, 99]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    loaded = rt.load(bundle)
    assert np.abs(loaded.last_logits([ids])[0] - expected).max() < 1e-4
    assert rt.conversation.template_of(loaded).render("hi") == "<s>user: hi</s><s>assistant: "
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "gguf", "hf"]  # the temporary HF directory is gone


def test_a_gguf_missing_a_tensor_is_refused(tmp_path, capsys):
    """transformers would leave the parameter randomly initialised (a warning we silence): refused instead."""
    from conftest import tiny_model

    gguf_file = write_tiny_llama_gguf(tmp_path / "holey.gguf", tiny_model("llama"), leave_out=("blk.1.ffn_norm.weight",))
    _refuse_case(capsys, tmp_path, gguf_file, "1 parameters were not loaded (e.g. model.layers.1.post_attention_layernorm.weight)")


def test_a_model_directory_missing_a_tensor_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from conftest import tiny_model

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    _refuse_case(capsys, tmp_path, model_dir, "cannot load model from", "1 parameters were not loaded (e.g. model.layers.0.mlp.up_proj.weight)")


def _export_cli_verified(capsys, *args):
    from adainfer.exporter.cli import main

    capsys.readouterr()
    rc = main([*args, "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def _refuse_case(capsys, tmp_path, model: Path, *needles):
    target = tmp_path / "out" / "bundle"
    target.parent.mkdir()
    rc, out, err = _export_cli(capsys, str(model), "-o", str(target))
    _assert_refused(rc, out, err, *needles)
    assert list(target.parent.iterdir()) == []  # no bundle, no temporary directory


def test_header_of_a_small_gguf(tmp_path):
    header = gguf_source.read_header(write_gguf(tmp_path / "tiny.gguf", "llama"))
    assert header == gguf_source.GGUFHeader(architecture="llama", quantization="ALL_F32", tensors=1)


def test_unsupported_architecture_is_refused(capsys, tmp_path):
    model = write_gguf(tmp_path / "mamba.gguf", "mamba")
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'mamba'; supported: gpt2, llama, mistral, qwen2"):
        gguf_source.read_header(model)
    _refuse_case(capsys, tmp_path, model, "unsupported GGUF architecture 'mamba'", "llama")


def test_not_a_gguf_file_is_refused(capsys, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_text("this is not a GGUF file\n")
    _refuse_case(capsys, tmp_path, model, "not a GGUF file")


def test_corrupt_gguf_is_refused(capsys, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    _refuse_case(capsys, tmp_path, model, "not a readable GGUF file, truncated or corrupt")


@pytest.mark.parametrize("keep", [100_000, 50_000_000])
def test_truncated_real_gguf_is_refused(capsys, tmp_path, smollm2_gguf, keep):
    """A copy of SmolLM2's GGUF cut inside its tokenizer header / inside its tensor data."""
    model = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src:
        model.write_bytes(src.read(keep))
    _refuse_case(capsys, tmp_path, model, "cut.gguf", "truncated")


def test_directory_with_several_ggufs_is_refused(capsys, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    write_gguf(models / "a.gguf", "llama")
    write_gguf(models / "b.gguf", "llama")
    _refuse_case(capsys, tmp_path, models, "holds 2 GGUF files (a.gguf, b.gguf); pass the one to export")


def test_finding_the_gguf(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    assert gguf_source.find_gguf(models) is None  # an empty directory is left to the Hugging Face path
    one = write_gguf(models / "only.gguf", "llama")
    assert gguf_source.find_gguf(models) == one
    assert gguf_source.find_gguf(one) == one
    renamed = tmp_path / "no-suffix"
    shutil.copyfile(one, renamed)
    assert gguf_source.find_gguf(renamed) == renamed  # recognised by its magic bytes
    (models / "config.json").write_text("{}")
    assert gguf_source.find_gguf(models) is None  # a Hugging Face directory, whatever else it holds


def test_unsupported_architecture_through_the_api_writes_nothing(tmp_path):
    from adainfer.exporter import export

    with pytest.raises(ExportError, match="unsupported GGUF architecture 'mamba'"):
        export(write_gguf(tmp_path / "m.gguf", "mamba"), tmp_path / "b", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ------------------------------------------------------------------ the manifest's source record

SOURCE = {"format": "gguf", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "size": 98362432,
          "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "quantization": "Q4_1"}


def _manifest_with(stories_bundle, source):
    data = json.loads((stories_bundle / "manifest.json").read_text())
    assert "source" not in data  # a Hugging Face export records none (and its digest is unchanged)
    data["source"] = source
    return data


def test_manifest_source_round_trip(stories_bundle):
    manifest = Manifest.from_dict(_manifest_with(stories_bundle, SOURCE))
    assert manifest.source.quantization == "Q4_1"
    assert json.loads(manifest.to_json())["source"] == SOURCE
    plain = Manifest.load(stories_bundle)
    assert plain.source is None and plain.digest() != manifest.digest()


@pytest.mark.parametrize("change, needle", [
    (lambda s: s.update(format="safetensors"), "source.format 'safetensors' is not one of gguf"),
    (lambda s: s.update(file="../x.gguf"), "source.file '../x.gguf' is not a plain file name"),
    (lambda s: s.update(file=""), "is not a plain file name"),
    (lambda s: s.update(sha256="B179"), "source.sha256 is not 64 lowercase hex digits"),
    (lambda s: s.update(size=-1), "source.size is negative"),
    (lambda s: s.update(size="98362432"), "source.size must be an integer"),
    (lambda s: s.update(quantization=""), "source.quantization is not a short printable name"),
    (lambda s: s.update(extra=1), "unknown field manifest.source.extra"),
    (lambda s: s.pop("sha256"), "missing field manifest.source.sha256"),
])
def test_manifest_source_is_validated(stories_bundle, change, needle):
    source = dict(SOURCE)
    change(source)
    with pytest.raises(BundleError, match="manifest.json: .*") as info:
        Manifest.from_dict(_manifest_with(stories_bundle, source))
    assert needle in str(info.value)
