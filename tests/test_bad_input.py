"""Bad input across `adainfer-export`, `adainfer run` and the Python API: every case ends with one
line naming the problem and exit code 2 (CLI), or a documented `AdainferError` subclass (API);
never a traceback, never a half-written bundle.

The CLI cases call the entry points' `main` in this process (the same code as the console
scripts, minus interpreter start-up); a few run as real subprocesses to cover that too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest

import adainfer.runtime as rt
from adainfer.errors import AdainferError, BundleError, ExportError, InputError, UnsupportedModelError
from conftest import STORIES_DIR, run_cli

PROMPT = "Once upon a time"


# ------------------------------------------------------------------ helpers


def call_cli(capsys, prog: str, *args: str) -> tuple[int, str, str]:
    """Run `adainfer` or `adainfer-export` in-process; (exit code, stdout, stderr)."""
    from adainfer.cli import main as adainfer_main
    from adainfer.exporter.cli import main as export_main

    main = {"adainfer": adainfer_main, "adainfer-export": export_main}[prog]
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out, err, *needles, prog=None):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert ": error: " in lines[0], lines[0]
    if prog:
        assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def edit_manifest(bundle: Path, change) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


def replace_with_digest(bundle: Path, name: str, data: bytes) -> None:
    """Replace a bundle file and fix up its size and sha256 in the manifest (a consistent forgery)."""
    (bundle / name).write_bytes(data)

    def fix(m):
        for entry in [*m["files"].values(), *m["graphs"].values()]:
            if entry["file"] == name:
                entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    edit_manifest(bundle, fix)


@pytest.fixture
def bundle(stories_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(stories_bundle, dst)
    return dst


@pytest.fixture(scope="module")
def model(stories_bundle):
    return rt.load(stories_bundle)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(STORIES_DIR, dst)
    return dst


# ------------------------------------------------------------------ adainfer run: options

RUN_OPTION_CASES = {
    "negative max-new-tokens": (["--max-new-tokens", "-1"], "max_new_tokens must be a non-negative integer"),
    "max-new-tokens not a number": (["--max-new-tokens", "ten"], "argument --max-new-tokens: invalid int value"),
    "negative temperature": (["--temperature", "-0.5"], "temperature must be a finite number >= 0"),
    "temperature nan": (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    "temperature inf": (["--temperature", "inf"], "temperature must be a finite number >= 0"),
    "top-p 0": (["--top-p", "0"], "top_p must be in (0, 1]"),
    "top-p above 1": (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    "negative seed": (["--seed", "-3"], "seed must be a non-negative integer"),
    "negative threads": (["--threads", "-2"], "threads must be a non-negative integer"),
    "unknown flag": (["--colour", "red"], "unrecognized arguments: --colour red"),
}


@pytest.mark.parametrize("case", sorted(RUN_OPTION_CASES))
def test_run_bad_option(case, stories_bundle, capsys):
    flags, needle = RUN_OPTION_CASES[case]
    rc, out, err = call_cli(capsys, "adainfer", "run", str(stories_bundle), PROMPT, *flags)
    assert_one_line_error(rc, out, err, needle)
    assert out == ""  # refused before any text was printed


def test_run_too_many_positionals(stories_bundle, capsys):
    rc, out, err = call_cli(capsys, "adainfer", "run", str(stories_bundle), "Once", "upon")
    assert_one_line_error(rc, out, err, "expected [BUNDLE] PROMPT", prog="adainfer")


def test_run_max_new_tokens_fill_context_even_when_truncating(stories_bundle, capsys):
    rc, out, err = call_cli(capsys, "adainfer", "run", str(stories_bundle), PROMPT, "--max-new-tokens", "512",
                            "--truncate-prompt")
    assert_one_line_error(rc, out, err, "512 new tokens leave no room for the prompt in the model's 512 positions")


def test_run_overlong_prompt_names_the_option(stories_bundle, capsys):
    rc, out, err = call_cli(capsys, "adainfer", "run", str(stories_bundle), "Once upon a time " * 200)
    assert_one_line_error(rc, out, err, "more than the model's 512 positions", "--truncate-prompt")


# ------------------------------------------------------------------ adainfer run: broken bundles

BUNDLE_CASES = {
    "bundle path is a file": (lambda b: (shutil.rmtree(b), b.write_text("x")), "not a bundle directory"),
    "no manifest": (lambda b: (b / "manifest.json").unlink(), "not a bundle (no manifest.json)"),
    "manifest is a directory": (lambda b: ((b / "manifest.json").unlink(), (b / "manifest.json").mkdir()),
                                "manifest.json: not a regular file"),
    "manifest not UTF-8": (lambda b: (b / "manifest.json").write_bytes(b'{"schema_version": 1, "family": "\xff"}'),
                           "manifest.json: not UTF-8 text"),
    "manifest truncated JSON": (lambda b: (b / "manifest.json").write_text((b / "manifest.json").read_text()[:300]),
                                "manifest.json: not valid JSON"),
    "manifest is a list": (lambda b: (b / "manifest.json").write_text("[1, 2]"), "expected a JSON object, got a list"),
    "manifest with NaN": (lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"hidden_size": 64', '"hidden_size": NaN')), "NaN is not a number JSON allows"),
    "manifest duplicate key": (lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"num_heads": 8', '"num_heads": 8, "num_heads": 4')),
        "field 'num_heads' appears twice"),
    "schema version missing": (lambda b: edit_manifest(b, lambda m: m.pop("schema_version")), "schema_version is missing"),
    "schema version 0": (lambda b: edit_manifest(b, lambda m: m.update(schema_version=0)), "schema version 0 is no longer supported"),
    "schema version from the future": (lambda b: edit_manifest(b, lambda m: m.update(schema_version=2)), "schema version 2 is newer"),
    "missing field": (lambda b: edit_manifest(b, lambda m: m.pop("hidden_size")), "missing field manifest.hidden_size"),
    "extra field": (lambda b: edit_manifest(b, lambda m: m.update(colour="red")), "unknown field manifest.colour"),
    "nested extra field": (lambda b: edit_manifest(b, lambda m: m["graphs"]["embed"].update(extra=1)),
                           "unknown field manifest.graphs.embed.extra"),
    "wrong type": (lambda b: edit_manifest(b, lambda m: m.update(num_layers="5")), "manifest.num_layers must be an integer"),
    "huge number": (lambda b: edit_manifest(b, lambda m: m.update(vocab_size=10**30)), "manifest.vocab_size is out of range"),
    "float where an int belongs": (lambda b: edit_manifest(b, lambda m: m.update(head_dim=8.0)), "manifest.head_dim must be an integer"),
    "heads not divisible": (lambda b: edit_manifest(b, lambda m: m.update(num_kv_heads=3)),
                            "num_heads (8) is not a multiple of num_kv_heads (3)"),
    "zero layers": (lambda b: edit_manifest(b, lambda m: m.update(num_layers=0)), "num_layers must be positive"),
    "num_layers too large": (lambda b: edit_manifest(b, lambda m: m.update(num_layers=10**9)),
                             "num_layers is 1000000000 but graphs has 5 block graphs"),
    "block beyond num_layers": (lambda b: edit_manifest(b, lambda m: (m.update(num_layers=4), m["macs"]["blocks"].pop())),
                                "graph block_04 is not one of the 4 blocks"),
    "geometry disagrees with graphs": (lambda b: edit_manifest(b, lambda m: m.update(head_dim=16)),
                                       "past_key has 8 where head_dim is 16"),
    "eos outside vocabulary": (lambda b: edit_manifest(b, lambda m: m.update(eos_token_ids=[2, 9999])),
                               "eos_token_ids[1] 9999 is outside the vocabulary"),
    "bad sha256 text": (lambda b: edit_manifest(b, lambda m: m["graphs"]["embed"].update(sha256="abc")),
                        "sha256 of graphs.embed is not 64 lowercase hex digits"),
    "file escaping with ..": (lambda b: edit_manifest(b, lambda m: m["files"]["tokenizer"].update(file="../tokenizer.json")),
                              "file name '../tokenizer.json' is not a plain path inside the bundle"),
    "absolute file name": (lambda b: edit_manifest(b, lambda m: m["files"]["config"].update(file="/etc/passwd")),
                           "file name '/etc/passwd' is not a plain path"),
    "two entries, one file": (lambda b: edit_manifest(b, lambda m: m["graphs"]["block_01"].update(m["graphs"]["block_00"])),
                              "graphs.block_01 and graphs.block_00 both name the file block_00.onnx"),
    "manifest vouches for itself": (lambda b: edit_manifest(b, lambda m: m["files"]["config"].update(file="manifest.json")),
                                    "files.config names the manifest itself"),
    "missing graph file": (lambda b: (b / "block_03.onnx").unlink(), "missing file block_03.onnx"),
    "graph file is a directory": (lambda b: ((b / "block_03.onnx").unlink(), (b / "block_03.onnx").mkdir()),
                                  "block_03.onnx is not a regular file"),
    "file size differs": (lambda b: (b / "config.json").write_text("{}"), "config.json has 2 bytes, the manifest says"),
    "symlink pointing outside": (lambda b: (shutil.copy(b / "tokenizer.json", b.parent / "elsewhere.json"),
                                            (b / "tokenizer.json").unlink(),
                                            (b / "tokenizer.json").symlink_to(b.parent / "elsewhere.json")),
                                 "tokenizer.json points outside the bundle"),
    "dangling symlink": (lambda b: ((b / "config.json").unlink(), (b / "config.json").symlink_to(b / "nowhere")),
                         "config.json is a broken or looping link"),
    "truncated ONNX with fixed-up digest": (lambda b: replace_with_digest(b, "block_02.onnx", (b / "block_02.onnx").read_bytes()[:5000]),
                                            "cannot load block_02.onnx"),
    "corrupt tokenizer with fixed-up digest": (lambda b: replace_with_digest(b, "tokenizer.json", b'{"version": "1.0", "model": 3}'),
                                               "cannot read tokenizer"),
    "manifest lists an input the graph lacks": (
        lambda b: edit_manifest(b, lambda m: m["graphs"]["final_head"]["inputs"].append(
            {"name": "temperature", "dtype": "float32", "shape": [1]})),
        "final_head.onnx inputs: the graph has hidden_states, the manifest says hidden_states, temperature"),
    "manifest rank disagrees with the graph": (
        lambda b: edit_manifest(b, lambda m: m["graphs"]["exit_head"]["outputs"][0].update(shape=["rows", 1])),
        "exit_head.onnx outputs: top1_id has 1 dimensions in the graph, 2 in the manifest"),
    "block without past_key": (
        lambda b: edit_manifest(b, lambda m: m["graphs"]["block_01"]["inputs"][3].update(name="past_k")),
        "graphs.block_01.inputs has no past_key"),
    "manifest dtype disagrees with the graph": (
        lambda b: edit_manifest(b, lambda m: m["graphs"]["final_head"]["inputs"][0].update(dtype="float16")),
        "final_head.onnx inputs: hidden_states is float32 in the graph, float16 in the manifest"),
}


@pytest.mark.parametrize("case", sorted(BUNDLE_CASES))
def test_run_broken_bundle(case, bundle, capsys):
    breaker, needle = BUNDLE_CASES[case]
    breaker(bundle)
    rc, out, err = call_cli(capsys, "adainfer", "run", str(bundle), PROMPT, "--max-new-tokens", "2")
    assert_one_line_error(rc, out, err, needle, prog="adainfer")
    with pytest.raises(BundleError):  # the same through the API
        rt.load(bundle)


def test_manifest_symlink_outside_is_refused(bundle):
    outside = bundle.parent / "manifest-elsewhere.json"
    shutil.move(bundle / "manifest.json", outside)
    (bundle / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match="a link that points outside the bundle"):
        rt.load(bundle)


def test_symlink_inside_the_bundle_is_fine(bundle):
    shutil.move(bundle / "config.json", bundle / "config.real.json")
    (bundle / "config.json").symlink_to("config.real.json")
    rt.load(bundle)


# ------------------------------------------------------------------ adainfer-export


def _write_config(model_dir: Path, text) -> None:
    (model_dir / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())


EXPORT_CASES = {
    "model dir is a file": (lambda m, t: (shutil.rmtree(m), m.write_text("x")), "not a directory"),
    "no config.json": (lambda m, t: (m / "config.json").unlink(), "no config.json"),
    "config.json invalid JSON": (lambda m, t: _write_config(m, '{"model_type": "llama",'), "config.json: not valid JSON"),
    "config.json not UTF-8": (lambda m, t: _write_config(m, b'{"model_type": "\xfe"}'), "config.json: not valid JSON"),
    "config.json is a list": (lambda m, t: _write_config(m, "[]"), "config.json: no model_type"),
    "config missing model_type": (lambda m, t: _write_config(m, '{"hidden_size": 64}'), "config.json: no model_type"),
    "model_type not a string": (lambda m, t: _write_config(m, '{"model_type": ["llama"]}'), "model_type must be a string"),
    "unsupported model_type": (lambda m, t: _write_config(m, '{"model_type": "bert"}'), "unsupported architecture 'bert'"),
    "only pytorch_model.bin": (lambda m, t: (m / "model.safetensors").rename(m / "pytorch_model.bin"),
                               "no .safetensors weights (pickled checkpoints are not loaded)"),
    "corrupt tokenizer.json": (lambda m, t: (m / "tokenizer.json").write_text('{"model": '), "tokenizer.json: not a usable tokenizer"),
    "weights that do not fit the config": (lambda m, t: _write_config(m, (m / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 96')),
                                           "cannot load model"),
    "output path is an existing file": (lambda m, t: t.write_text("x"), "output path exists and is not a directory"),
    "output parent is a file": (lambda m, t: None, "cannot write"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_bad_input(case, model_dir, tmp_path, capsys):
    breaker, needle = EXPORT_CASES[case]
    target = tmp_path / "out" / "bundle"
    target.parent.mkdir()
    if case == "output parent is a file":
        (tmp_path / "out" / "plain").write_text("x")
        target = tmp_path / "out" / "plain" / "bundle"
    breaker(model_dir, target)
    before = sorted(p.name for p in target.parent.iterdir()) if target.parent.is_dir() else None
    rc, out, err = call_cli(capsys, "adainfer-export", str(model_dir), "-o", str(target), "--quiet", "--no-verify")
    assert_one_line_error(rc, out, err, needle, prog="adainfer-export")
    if before is not None:  # nothing new beside the target: no bundle, no temporary directory
        assert sorted(p.name for p in target.parent.iterdir()) == before


def test_export_read_only_parent(model_dir, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root ignores permissions: use a place even root cannot write
            parent = Path("/sys/adainfer-test")
            try:
                parent.mkdir()
            except OSError:
                pass
            else:
                parent.rmdir()
                pytest.skip("no read-only directory available to this user")
        rc, out, err = call_cli(capsys, "adainfer-export", str(model_dir), "-o", str(parent / "bundle"), "--quiet")
        assert_one_line_error(rc, out, err, "cannot write", str(parent / "bundle"))
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_export_force_refuses_to_replace_the_model_dir(model_dir, capsys):
    rc, out, err = call_cli(capsys, "adainfer-export", str(model_dir), "-o", str(model_dir), "--force", "--quiet")
    assert_one_line_error(rc, out, err, "would replace the model directory")
    assert (model_dir / "model.safetensors").is_file()


def test_export_force_refuses_to_replace_a_non_bundle(model_dir, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    rc, out, err = call_cli(capsys, "adainfer-export", str(model_dir), "-o", str(precious), "--force", "--quiet")
    assert_one_line_error(rc, out, err, "it is not a bundle (no manifest.json)")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_export_unknown_flag(capsys):
    rc, out, err = call_cli(capsys, "adainfer-export", "--fp8")
    assert_one_line_error(rc, out, err, "unrecognized arguments: --fp8", prog="adainfer-export")


# ------------------------------------------------------------------ real subprocesses


def test_subprocess_cli_errors_are_one_line(bundle, tmp_path):
    (bundle / "manifest.json").write_text("[]")
    rc, out, err = run_cli("adainfer", "run", str(bundle), PROMPT)
    assert_one_line_error(rc, out, err, "expected a JSON object, got a list", prog="adainfer")
    rc, out, err = run_cli("adainfer", "run", str(bundle), PROMPT, "--top-p", "2")
    assert_one_line_error(rc, out, err, "top_p must be in (0, 1]", prog="adainfer")
    rc, out, err = run_cli("adainfer", "run", "--max-new-tokens")
    assert_one_line_error(rc, out, err, "expected one argument", prog="adainfer run")


# ------------------------------------------------------------------ Python API

API_CASES = {
    "max_new_tokens negative": (dict(max_new_tokens=-1), InputError, "max_new_tokens must be a non-negative integer"),
    "max_new_tokens a float": (dict(max_new_tokens=2.5), InputError, "max_new_tokens must be a non-negative integer"),
    "max_new_tokens a bool": (dict(max_new_tokens=True), InputError, "max_new_tokens must be a non-negative integer"),
    "temperature negative": (dict(temperature=-1.0), InputError, "temperature must be a finite number"),
    "temperature nan": (dict(temperature=math.nan), InputError, "temperature must be a finite number"),
    "temperature a string": (dict(temperature="hot"), InputError, "temperature must be a finite number"),
    "top_p zero": (dict(top_p=0.0), InputError, r"top_p must be in \(0, 1\]"),
    "top_p nan": (dict(top_p=math.nan), InputError, r"top_p must be in \(0, 1\]"),
    "seed negative": (dict(seed=-1), InputError, "seed must be a non-negative integer"),
    "seed a string": (dict(seed="42"), InputError, "seed must be a non-negative integer"),
    "truncate right": (dict(truncate="right"), InputError, "truncate must be None or 'left'"),
    "prompt None": (dict(prompt=None), InputError, "a prompt must be text or a sequence of token ids"),
    "prompt of floats": (dict(prompt=[1, 2.5]), InputError, "token ids must be integers"),
    "prompt token out of vocabulary": (dict(prompt=[1, 600]), InputError, "token id 600 is outside the vocabulary"),
    "prompt empty ids": (dict(prompt=[]), InputError, "empty prompt"),
    "prompt too long": (dict(prompt=[1] * 600), InputError, "600 tokens, more than the model's 512 positions"),
    "prompt plus new tokens too long": (dict(prompt=[1] * 500, max_new_tokens=20), InputError,
                                        "prompt of 500 tokens plus 20 new tokens exceeds"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
@pytest.mark.parametrize("method", ["generate", "stream"])
def test_api_bad_request(case, method, model):
    kwargs, exc_type, match = API_CASES[case]
    kwargs = {"prompt": PROMPT, "max_new_tokens": 2, **kwargs}
    assert issubclass(exc_type, AdainferError)
    with pytest.raises(exc_type, match=match):
        result = getattr(model, method)(**kwargs)
        list(result) if method == "stream" else None


def test_api_load_errors(stories_bundle, tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        rt.load(tmp_path / "nothing")
    with pytest.raises(InputError, match="threads must be a non-negative integer"):
        rt.load(stories_bundle, threads=-1)
    with pytest.raises(BundleError, match="execution provider not available"):
        rt.load(stories_bundle, providers=["NoSuchExecutionProvider"])


def test_api_export_errors(tmp_path, stories_hf):
    from adainfer.exporter import export, export_model

    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="output path exists and is not a directory"):
        export_model(stories_hf, tmp_path / "file", force=True)
    with pytest.raises(ExportError, match="model directory not found"):
        export(tmp_path / "missing", tmp_path / "b")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnsupportedModelError):
        export(bert, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "file"]
