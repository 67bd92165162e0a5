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
from adainfer.manifest import Manifest


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
