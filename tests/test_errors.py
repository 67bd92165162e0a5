"""Bad input: one line naming the problem, non-zero exit, no traceback, no half-written bundle."""

import json
import shutil

import pytest

import adainfer.runtime as rt
from adainfer.errors import BundleError, ExportError, InputError, UnsupportedModelError
from conftest import STORIES_DIR, run_cli


def _assert_one_line_error(rc, out, err, *needles):
    assert rc == 2, (rc, err)  # the README's promise: user errors exit 2 (1 is for the machine, 130 for Ctrl-C)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def bundle_copy(stories_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(stories_bundle, dst)
    return dst


def test_export_missing_model_dir(tmp_path):
    rc, out, err = run_cli("adainfer-export", str(tmp_path / "nope"), "-o", str(tmp_path / "b"))
    _assert_one_line_error(rc, out, err, "model directory not found")
    assert not (tmp_path / "b").exists()


def test_export_unsupported_architecture(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc, out, err = run_cli("adainfer-export", str(model), "-o", str(tmp_path / "b"))
    _assert_one_line_error(rc, out, err, "unsupported architecture 'bert'", "llama", "gpt2", "opt", "qwen2")
    assert not (tmp_path / "b").exists()


def test_export_corrupt_weights_leaves_nothing(tmp_path):
    model = tmp_path / "broken"
    shutil.copytree(STORIES_DIR, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    rc, out, err = run_cli("adainfer-export", str(model), "-o", str(tmp_path / "b"))
    _assert_one_line_error(rc, out, err, "cannot load model")
    assert list(tmp_path.iterdir()) == [model]


def test_failed_verification_leaves_no_bundle(tmp_path, monkeypatch):
    from adainfer.exporter import export, verify

    monkeypatch.setattr(verify, "TOLERANCE", 0.0)  # nothing can pass: the export must fail cleanly
    with pytest.raises(ExportError, match="verification failed"):
        export(STORIES_DIR, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_target_without_force(stories_bundle):
    rc, out, err = run_cli("adainfer-export", "-o", str(stories_bundle))
    _assert_one_line_error(rc, out, err, "already exists", "--force")


def test_unsupported_architecture_api():
    from adainfer.exporter.families import adapter_class_for

    with pytest.raises(UnsupportedModelError, match="supported model types: gpt2, llama, mistral, opt, qwen2"):
        adapter_class_for("falcon")


def test_bundle_missing_file(bundle_copy):
    (bundle_copy / "block_02.onnx").unlink()
    rc, out, err = run_cli("adainfer", "run", str(bundle_copy), "Once upon a time")
    _assert_one_line_error(rc, out, err, "missing file block_02.onnx")


def test_bundle_digest_mismatch(bundle_copy):
    path = bundle_copy / "block_01.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    rc, out, err = run_cli("adainfer", "run", str(bundle_copy), "Once upon a time")
    _assert_one_line_error(rc, out, err, "sha256 of block_01.onnx does not match")
    # the size-only check (trusted media) does not read digests, but still loads
    rt.load(bundle_copy, check_digests=False)


def test_bundle_newer_schema(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    rc, out, err = run_cli("adainfer", "run", str(bundle_copy), "Once upon a time")
    _assert_one_line_error(rc, out, err, "schema version 99 is newer")


def test_bundle_missing_directory(tmp_path):
    rc, out, err = run_cli("adainfer", "run", str(tmp_path / "none"), "Once upon a time")
    _assert_one_line_error(rc, out, err, "bundle directory not found")


def test_empty_prompt(stories_bundle):
    rc, out, err = run_cli("adainfer", "run", str(stories_bundle), "   ")
    _assert_one_line_error(rc, out, err, "empty prompt")
    with pytest.raises(InputError, match="empty prompt"):
        rt.load(stories_bundle).generate("")


def test_prompt_longer_than_max_positions(stories_bundle):
    prompt = "Once upon a time " * 200  # ~ 800 tokens > 512 positions
    rc, out, err = run_cli("adainfer", "run", str(stories_bundle), prompt)
    _assert_one_line_error(rc, out, err, "more than the model's 512 positions")
    rc, out, err = run_cli("adainfer", "run", str(stories_bundle), "Once upon a time " * 100, "--max-new-tokens", "200")
    _assert_one_line_error(rc, out, err, "plus 200 new tokens exceeds the model's 512 positions")


def test_manifest_file_escaping_bundle(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["graphs"]["embed"]["file"] = "../embed.onnx"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a plain path inside the bundle"):
        rt.load(bundle_copy)


def test_token_ids_out_of_vocabulary(stories_bundle):
    with pytest.raises(InputError, match="outside the vocabulary"):
        rt.load(stories_bundle).last_logits([[1, 600]])
