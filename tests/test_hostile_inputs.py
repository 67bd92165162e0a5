"""Hostile inputs, one row each: the command or API call, what must happen (exit code or exception
type), a fragment of the one-line message, and that the bundle on disk is byte-identical afterwards.

The promise (README "Robustness"): bad input ends with ONE line on stderr and exit code 2 (the
Python API raises an `AdainferError` subclass whose message is one line); never a traceback, and
the bundle a command was pointed at is left exactly as it was. Rows with expected code 0 are
hostile-looking inputs that must simply work.

Speed: one bundle per module (copied once), rows that break a bundle work on a fresh copy of
it; CLI rows call the entry points' `main` in this process, and only rows where the process
itself is the point (argv bytes, a closed stdout, SIGKILL) start a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import pytest

import adainfer.runtime as rt
from adainfer.errors import AdainferError, BundleError, ExportError, InputError, UnsupportedModelError
from adainfer.manifest import Manifest
from conftest import STORIES_DIR, make_classifier, put_policy

PROMPT = "Once upon a time"


# ------------------------------------------------------------------ the table's machinery


@dataclass
class Row:
    """One hostile input. `call` is a CLI argv (list, first item `adainfer` or `adainfer-export`;
    "{B}" is replaced by the bundle's path, "{T}" by a scratch directory) or a function
    `(bundle, scratch, model) -> None` for the API. `expect`: exit code (CLI) or exception type (API).
    `setup(bundle, scratch)` breaks the row's own copy of the bundle first (None: the shared bundle).
    `process`: run the CLI in a real subprocess; `stdin_closed_stdout`: with file descriptor 1 closed."""

    name: str
    call: Union[list, Callable]
    expect: Union[int, type]
    fragment: str
    setup: Optional[Callable] = None
    base: str = "plain"  # "plain" (exported, no policy) or "policy" (with a hand-made rule policy)
    process: bool = False
    close_stdout: bool = False
    env: dict = field(default_factory=dict)


def snapshot(root: Path) -> dict:
    """Every entry under `root` (not following links): kind and content digest, link target or mode."""
    root = Path(root)
    if not os.path.lexists(root):
        return {}
    out = {}
    paths = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
    for path in paths:
        st = path.lstat()
        rel = path.relative_to(root).as_posix() if path != root else "."
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir",)
        else:
            out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def one_line(text: str) -> list[str]:
    """The lines of stderr, without progress bars (tqdm's "NAME:  40%|####  | 2/5" lines)."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]


def edit_manifest(bundle: Path, change: Callable[[dict], Any]) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


RULE_POLICY = {"decision": "rule", "features": ["gap"], "threshold": 0.8, "head": "full", "name": "gap>=0.8"}


def policy_with(**changes) -> Callable:
    def setup(bundle: Path, scratch: Path) -> None:
        put_policy(bundle, {**RULE_POLICY, **changes})
    return setup


def classifier_policy(width: int, **changes) -> Callable:
    def setup(bundle: Path, scratch: Path) -> None:
        policy = {**RULE_POLICY, "decision": "classifier", "features": ["gap", "top_prob"],
                  "classifier_file": "classifier.onnx", "score_output": 1, "score_column": 1, **changes}
        put_policy(bundle, policy, {"classifier.onnx": make_classifier(width)}, attach=("classifier.onnx",))
    return setup


def with_external_data(bundle: Path, graph: str, location: str, listed: bool) -> None:
    """Move `graph`'s weights into ONNX external data at `location` (relative to the graph);
    the manifest's digest of the graph is fixed up, its data file listed only if `listed`."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    path = bundle / f"{graph}.onnx"
    model = onnx.load(str(path))
    # onnx refuses to write a location with "..": write a same-length one, then edit the bytes
    written = "zz" + location[2:] if location.startswith("..") else location
    (path.parent / written).parent.mkdir(parents=True, exist_ok=True)
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=written, size_threshold=0)
    onnx.save(model, str(path))
    if written != location:
        path.write_bytes(path.read_bytes().replace(written.encode(), location.encode()))
        (path.parent / location).resolve().parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path.parent / written, path.parent / location)
        shutil.rmtree(path.parent / "zz", ignore_errors=True)
    data = (path.parent / location).resolve()
    spec = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}

    def fix(m):
        m["graphs"][graph].update(spec)
        if listed:
            m["graphs"][graph]["data_files"] = [{"file": location, "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                                 "size": data.stat().st_size}]
    edit_manifest(bundle, fix)


def fifo_at(bundle: Path, name: str) -> None:
    (bundle / name).unlink()
    os.mkfifo(bundle / name)


def flip_byte(bundle: Path, name: str) -> None:
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))


def two_short_documents(scratch: Path) -> Path:
    path = scratch / "two.txt"
    path.write_text("Once upon a time there was a cat.\n\nThe dog ran to the park and played.\n")
    return path


def model_dir_with(scratch: Path, change: Callable[[Path], Any]) -> Path:
    model_dir = scratch / "model"
    if not model_dir.exists():
        shutil.copytree(STORIES_DIR, model_dir)
    change(model_dir)
    return model_dir


MARKER = "executed-marker"


def pickle_weights(model_dir: Path) -> None:
    """A `pytorch_model.bin` whose unpickling would create a marker file; no safetensors."""
    (model_dir / "model.safetensors").unlink()
    payload = (b"cos\nsystem\n(S'touch " + str(model_dir.parent / MARKER).encode() + b"'\ntR.")
    (model_dir / "pytorch_model.bin").write_bytes(payload)


def remote_code(model_dir: Path) -> None:
    """A config whose `auto_map` names Python code that would create a marker file when imported."""
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_evil.py").write_text(f"open({str(model_dir.parent / MARKER)!r}, 'w').close()\n")


def big_tokenizer(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(100)])
    tok.save(str(model_dir / "tokenizer.json"))


# ------------------------------------------------------------------ API calls


def api(fn: Callable) -> Callable:
    return fn


def _step(model, ids):
    state, _ = model.start([[1, 403]])
    model.step(state, ids)


# ------------------------------------------------------------------ the table

ROWS: list[Row] = [
    # ---- adainfer run: options
    Row("run: negative max-new-tokens", ["adainfer", "run", "{B}", PROMPT, "--max-new-tokens", "-1"], 2,
        "max_new_tokens must be a non-negative integer"),
    Row("run: max-new-tokens not a number", ["adainfer", "run", "{B}", PROMPT, "--max-new-tokens", "ten"], 2,
        "argument --max-new-tokens: invalid int value"),
    Row("run: temperature nan", ["adainfer", "run", "{B}", PROMPT, "--temperature", "nan"], 2, "temperature must be a finite number >= 0"),
    Row("run: temperature -0.5", ["adainfer", "run", "{B}", PROMPT, "--temperature", "-0.5"], 2, "temperature must be a finite number >= 0"),
    Row("run: temperature 1e-38 (tiny but valid: as good as greedy)",
        ["adainfer", "run", "{B}", PROMPT, "--temperature", "1e-38", "--seed", "1", "--max-new-tokens", "8", "--json"], 0,
        '"new_tokens": 8'),
    Row("run: top-p 0", ["adainfer", "run", "{B}", PROMPT, "--top-p", "0"], 2, "top_p must be in (0, 1]"),
    Row("run: top-p 1.5", ["adainfer", "run", "{B}", PROMPT, "--top-p", "1.5"], 2, "top_p must be in (0, 1]"),
    Row("run: negative seed", ["adainfer", "run", "{B}", PROMPT, "--seed", "-3"], 2, "seed must be a non-negative integer"),
    Row("run: negative threads", ["adainfer", "run", "{B}", PROMPT, "--threads", "-2"], 2, "threads must be a non-negative integer"),
    Row("run: threads 100000", ["adainfer", "run", "{B}", PROMPT, "--threads", "100000"], 2, "threads must be at most"),
    Row("run: max-draft -3", ["adainfer", "run", "{B}", PROMPT, "--mode", "speculative", "--max-draft", "-3"], 2,
        "max_draft must be an integer >= 1"),
    Row("run: max-draft 0", ["adainfer", "run", "{B}", PROMPT, "--max-draft", "0"], 2, "max_draft must be an integer >= 1"),
    Row("run: unknown mode", ["adainfer", "run", "{B}", PROMPT, "--mode", "turbo"], 2, "argument --mode: invalid choice: 'turbo'"),
    Row("run: unknown flag", ["adainfer", "run", "{B}", PROMPT, "--colour", "red"], 2, "unrecognized arguments: --colour red"),
    Row("run: three positionals", ["adainfer", "run", "{B}", "Once", "upon"], 2, "expected [BUNDLE] PROMPT"),
    Row("run: blank prompt", ["adainfer", "run", "{B}", "   "], 2, "empty prompt"),
    Row("run: prompt over the positions", ["adainfer", "run", "{B}", PROMPT * 100], 2, "more than the model's 512 positions"),
    Row("run: new tokens leave no room", ["adainfer", "run", "{B}", PROMPT, "--max-new-tokens", "512", "--truncate-prompt"], 2,
        "leave no room for the prompt"),
    Row("run: early-exit without a policy", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2, "has no exit policy"),
    Row("run: speculative --json without a policy", ["adainfer", "run", "{B}", PROMPT, "--mode", "speculative", "--json"], 2,
        "has no exit policy"),
    Row("run: prompt with invalid UTF-8 bytes", ["adainfer", "run", "{B}", b"Once \xff\xfe upon"], 2, "not valid UTF-8",
        process=True),
    Row("run: stdout closed", ["adainfer", "run", "{B}", PROMPT, "--max-new-tokens", "4"], 2, "standard output is closed",
        process=True, close_stdout=True),
    # ---- adainfer run: broken bundles
    Row("bundle: directory missing", ["adainfer", "run", "{T}/none", PROMPT], 2, "bundle directory not found"),
    Row("bundle: path is a file", ["adainfer", "run", "{B}/config.json", PROMPT], 2, "not a bundle directory"),
    Row("bundle: no manifest", ["adainfer", "run", "{B}", PROMPT], 2, "not a bundle (no manifest.json)",
        setup=lambda b, t: (b / "manifest.json").unlink()),
    Row("bundle: manifest is a JSON list", ["adainfer", "run", "{B}", PROMPT], 2, "expected a JSON object, got a list",
        setup=lambda b, t: (b / "manifest.json").write_text("[1]")),
    Row("bundle: manifest truncated", ["adainfer", "run", "{B}", PROMPT], 2, "manifest.json: not valid JSON",
        setup=lambda b, t: (b / "manifest.json").write_text((b / "manifest.json").read_text()[:200])),
    Row("bundle: manifest is a FIFO", ["adainfer", "run", "{B}", PROMPT], 2, "manifest.json: not a regular file",
        setup=lambda b, t: fifo_at(b, "manifest.json")),
    Row("bundle: block graph is a FIFO", ["adainfer", "run", "{B}", PROMPT], 2, "block_02.onnx is not a regular file",
        setup=lambda b, t: fifo_at(b, "block_02.onnx")),
    Row("bundle: tampered weights, same size", ["adainfer", "run", "{B}", PROMPT], 2, "sha256 of block_01.onnx does not match",
        setup=lambda b, t: flip_byte(b, "block_01.onnx")),
    Row("bundle: missing graph", ["adainfer", "run", "{B}", PROMPT], 2, "missing file block_03.onnx",
        setup=lambda b, t: (b / "block_03.onnx").unlink()),
    Row("bundle: tokenizer links outside", ["adainfer", "run", "{B}", PROMPT], 2, "tokenizer.json points outside the bundle",
        setup=lambda b, t: (shutil.move(b / "tokenizer.json", t / "tok.json"), (b / "tokenizer.json").symlink_to(t / "tok.json"))),
    Row("bundle: manifest links outside", ["adainfer", "run", "{B}", PROMPT], 2, "a link that points outside the bundle",
        setup=lambda b, t: (shutil.move(b / "manifest.json", t / "m.json"), (b / "manifest.json").symlink_to(t / "m.json"))),
    Row("bundle: file name with ..", ["adainfer", "run", "{B}", PROMPT], 2, "is not a plain path inside the bundle",
        setup=lambda b, t: edit_manifest(b, lambda m: m["graphs"]["embed"].update(file="../embed.onnx"))),
    Row("bundle: graph uses external data the manifest does not list", ["adainfer", "run", "{B}", PROMPT], 2,
        "block_00.onnx uses external data block_00.onnx.data, which the manifest does not list",
        setup=lambda b, t: with_external_data(b, "block_00", "block_00.onnx.data", listed=False)),
    Row("bundle: graph's external data outside the bundle", ["adainfer", "run", "{B}", PROMPT], 2,
        "block_00.onnx uses external data '../outside.data', which is not a plain path inside the bundle",
        setup=lambda b, t: with_external_data(b, "block_00", "../outside.data", listed=False)),
    Row("bundle: listed external data overwritten", ["adainfer", "run", "{B}", PROMPT], 2,
        "sha256 of block_00.onnx.data does not match",
        setup=lambda b, t: (with_external_data(b, "block_00", "block_00.onnx.data", listed=True),
                            flip_byte(b, "block_00.onnx.data"))),
    Row("bundle: max_positions raised to 1e6, 60k-token prompt", ["adainfer", "run", "{B}", "a " * 60000, "--max-new-tokens", "1"],
        2, "not enough memory",
        setup=lambda b, t: edit_manifest(b, lambda m: m.update(max_positions=10**6))),
    Row("bundle: geometry disagrees with the graphs", ["adainfer", "run", "{B}", PROMPT], 2, "past_key has 8 where head_dim is 16",
        setup=lambda b, t: edit_manifest(b, lambda m: m.update(head_dim=16))),
    # ---- exit_policy.json and the files it names
    Row("policy: head_file ../outside.onnx", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "head_file '../outside.onnx' is not a plain path inside the bundle",
        setup=policy_with(decision="folded", head_file="../outside.onnx")),
    Row("policy: head_file /etc/passwd", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "head_file '/etc/passwd' is not a plain path inside the bundle",
        setup=policy_with(decision="folded", head_file="/etc/passwd")),
    Row("policy: classifier_file not listed in the manifest", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "classifier_file stray.onnx is not an attachment listed in manifest.json",
        setup=lambda b, t: (put_policy(b, {**RULE_POLICY, "decision": "classifier", "features": ["gap", "top_prob"],
                                           "classifier_file": "stray.onnx"}, {"stray.onnx": make_classifier(2)}))),
    Row("policy: head_file is a block graph", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "head_file block_00.onnx is not an attachment listed in manifest.json",
        setup=policy_with(decision="folded", head_file="block_00.onnx")),
    Row("policy: attached head_file that is a block graph", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "fake_head.onnx is not a folded exit head",
        setup=lambda b, t: put_policy(b, {**RULE_POLICY, "decision": "folded", "head_file": "fake_head.onnx"},
                                      {"fake_head.onnx": (b / "block_00.onnx").read_bytes()}, attach=("fake_head.onnx",))),
    Row("policy: threshold is a string", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "threshold must be a number", setup=policy_with(threshold="0.8")),
    Row("policy: threshold NaN", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "threshold must not be NaN", setup=lambda b, t: (put_policy(b, RULE_POLICY), _nan_threshold(b))),
    Row("policy: score_output out of range", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "score_output 7 is not an output of classifier.onnx", setup=classifier_policy(2, score_output=7)),
    Row("policy: score_column out of range", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "score_column 5 is not a column of classifier.onnx's output 1", setup=classifier_policy(2, score_column=5)),
    Row("policy: extras is a list", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "extras must be an object", setup=lambda b, t: put_policy(b, {**RULE_POLICY, "extras": [1, 2]})),
    Row("policy: rule with no features", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "decision 'rule' needs at least one feature", setup=policy_with(features=[])),
    Row("policy: classifier of the wrong input width", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "classifier.onnx takes 3 features, the policy lists 2", setup=classifier_policy(3)),
    Row("policy: unknown decision", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "unknown decision 'oracle'", setup=policy_with(decision="oracle")),
    Row("policy: unknown feature", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "unknown feature 'entropy'", setup=policy_with(features=["entropy"])),
    Row("policy: min_layer 0", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "min_layer and stride must be >= 1", setup=policy_with(min_layer=0)),
    Row("policy: stride a float", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "stride must be an integer", setup=policy_with(stride=1.5)),
    Row("policy: unknown field", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "not a valid exit policy", setup=policy_with(colour="red")),
    Row("policy: not JSON", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2, "not a valid exit policy",
        setup=lambda b, t: (put_policy(b, RULE_POLICY), _rewrite_attached(b, "exit_policy.json", b"{not json"))),
    Row("policy: calibrated for another export", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "calibrated for another export", setup=policy_with(extras={"manifest_digest": "0" * 64})),
    Row("policy: edited after it was attached", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit"], 2,
        "exit_policy.json has", setup=lambda b, t: (put_policy(b, RULE_POLICY), (b / "exit_policy.json").write_text("{}"))),
    Row("policy: a good rule policy runs", ["adainfer", "run", "{B}", PROMPT, "--mode", "early-exit", "--json",
                                            "--max-new-tokens", "4"], 0, '"mode": "early-exit"', base="policy"),
    # ---- adainfer calib / eval: options (refused before any work; the policy stays)
    Row("calib: holdout nan", ["adainfer", "calib", "{B}", "--holdout", "nan"], 2, "--holdout must be a number in (0, 1)",
        base="policy"),
    Row("calib: holdout 1.5", ["adainfer", "calib", "{B}", "--holdout", "1.5"], 2, "--holdout must be a number in (0, 1)",
        base="policy"),
    Row("calib: holdout 0", ["adainfer", "calib", "{B}", "--holdout", "0"], 2, "--holdout must be a number in (0, 1)",
        base="policy"),
    Row("calib: shots -1", ["adainfer", "calib", "{B}", "--task", "sst2", "--shots", "-1"], 2,
        "--shots must be an integer >= 0", base="policy"),
    Row("calib: rank -3", ["adainfer", "calib", "{B}", "--variant", "lowrank", "--rank", "-3"], 2,
        "--rank must be an integer >= 1", base="policy"),
    Row("calib: rank 0", ["adainfer", "calib", "{B}", "--rank", "0"], 2, "--rank must be an integer >= 1", base="policy"),
    Row("calib: rank above the hidden size", ["adainfer", "calib", "{B}", "--variant", "lowrank", "--rank", "100000"], 2,
        "--rank 100000 is more than the hidden size (64)", base="policy"),
    Row("calib: target agreement 1.5", ["adainfer", "calib", "{B}", "--target-agreement", "1.5"], 2,
        "--target-agreement must be in (0, 1]", base="policy"),
    Row("calib: target agreement nan", ["adainfer", "calib", "{B}", "--target-agreement", "nan"], 2,
        "--target-agreement must be in (0, 1]", base="policy"),
    Row("calib: limit 0", ["adainfer", "calib", "{B}", "--limit", "0"], 2, "--limit must be an integer >= 1", base="policy"),
    Row("calib: skip -1", ["adainfer", "calib", "{B}", "--skip", "-1"], 2, "--skip must be an integer >= 0", base="policy"),
    Row("calib: max-positions-per-doc -1", ["adainfer", "calib", "{B}", "--max-positions-per-doc", "-1"], 2,
        "--max-positions-per-doc must be an integer >= 1", base="policy"),
    Row("calib: data file missing", ["adainfer", "calib", "{B}", "--data", "{T}/missing.txt"], 2, "data file not found",
        base="policy"),
    Row("calib: data file not UTF-8", ["adainfer", "calib", "{B}", "--data", "{T}/bad.txt"], 2, "bad.txt:2: invalid UTF-8",
        base="policy", setup=lambda b, t: (t / "bad.txt").write_bytes(b"fine\nbad \xff\n")),
    Row("calib: data is a FIFO", ["adainfer", "calib", "{B}", "--data", "{T}/fifo.txt"], 2, "data file not found",
        base="policy", setup=lambda b, t: os.mkfifo(t / "fifo.txt")),
    Row("calib: two short documents cannot support the target", ["adainfer", "calib", "{B}", "--data", "{T}/two.txt"], 2,
        "held-out evidence too small", base="policy", setup=lambda b, t: two_short_documents(t)),
    Row("calib: reuse-policy from a missing bundle", ["adainfer", "calib", "{B}", "--reuse-policy", "{T}/none"], 2,
        "bundle directory not found", base="policy"),
    Row("calib: reuse-policy from itself", ["adainfer", "calib", "{B}", "--reuse-policy", "{B}"], 2,
        "is the bundle being calibrated", base="policy"),
    Row("calib: reuse-policy whose head_file leaves the source", ["adainfer", "calib", "{B}", "--reuse-policy", "{T}/src"], 2,
        "head_file '../outside.onnx' is not a plain path inside the bundle", base="policy",
        setup=lambda b, t: (shutil.copytree(b, t / "src"), _external_policy_source(t / "src"))),
    Row("calib: SIGKILL just before the swap (the old policy stays)", ["adainfer", "calib", "{B}", "--limit", "12"],
        -signal.SIGKILL, "", base="policy", process=True, env={"ADAINFER_TEST_KILL_AT": "rename"}),
    Row("eval: timing-samples -1", ["adainfer", "eval", "{B}", "--timing-samples", "-1"], 2,
        "--timing-samples must be an integer >= 0", base="policy"),
    Row("eval: max-positions-per-doc -1", ["adainfer", "eval", "{B}", "--max-positions-per-doc", "-1"], 2,
        "--max-positions-per-doc must be an integer >= 1", base="policy"),
    Row("eval: new-tokens -1", ["adainfer", "eval", "{B}", "--task", "generation", "--new-tokens", "-1"], 2,
        "--new-tokens must be an integer >= 1", base="policy"),
    Row("eval: no exit policy", ["adainfer", "eval", "{B}"], 2, "has no exit policy"),
    # ---- adainfer-export
    Row("export: model directory missing", ["adainfer-export", "{T}/nope", "-o", "{T}/out", "--quiet"], 2,
        "model directory not found"),
    Row("export: output exists, no --force", ["adainfer-export", "-o", "{B}", "--quiet"], 2, "already exists"),
    Row("export: --force onto a non-bundle", ["adainfer-export", "-o", "{T}", "--force", "--quiet"], 2,
        "it is not a bundle (no manifest.json)", setup=lambda b, t: (t / "notes.txt").write_text("keep me")),
    Row("export: unknown precision", ["adainfer-export", "-o", "{T}/out", "--precision", "int3"], 2, "invalid choice: 'int3'"),
    Row("export: pickled weights are never unpickled", ["adainfer-export", "{T}/model", "-o", "{T}/out", "--quiet"], 2,
        "no .safetensors weights (pickled checkpoints are not loaded)",
        setup=lambda b, t: model_dir_with(t, pickle_weights)),
    Row("export: auto_map code is never executed", ["adainfer-export", "{T}/model", "-o", "{T}/out", "--quiet"], 2,
        "unsupported architecture 'evil'", setup=lambda b, t: model_dir_with(t, remote_code)),
    Row("export: tokenizer larger than the model's vocabulary", ["adainfer-export", "{T}/model", "-o", "{T}/out", "--quiet",
                                                                 "--no-verify"], 2,
        "tokenizer.json has 612 tokens, more than the model's vocabulary of 512",
        setup=lambda b, t: model_dir_with(t, big_tokenizer)),
    # ---- Python API
    Row("api: load(None)", lambda b, t, m: rt.load(None), BundleError, "bundle path must be a path, got None"),
    Row("api: load(123)", lambda b, t, m: rt.load(123), BundleError, "bundle path must be a path, got int"),
    Row("api: load threads=100000", lambda b, t, m: rt.load(b, threads=100000), InputError, "threads must be at most"),
    Row("api: load threads=1.5", lambda b, t, m: rt.load(b, threads=1.5), InputError, "threads must be a non-negative integer"),
    Row("api: start(5)", lambda b, t, m: m.start(5), InputError, "prompts must be a list of token-id lists, got int"),
    Row("api: start('text')", lambda b, t, m: m.start("Once"), InputError, "prompts must be a list of token-id lists, got str"),
    Row("api: start([])", lambda b, t, m: m.start([]), InputError, "no prompts given"),
    Row("api: start([[1, 2], 3])", lambda b, t, m: m.start([[1, 2], 3]), InputError,
        "a prompt must be text or a sequence of token ids, got int"),
    Row("api: start with a 2-D array prompt", lambda b, t, m: m.start([np.array([[1, 2], [3, 4]])]), InputError,
        "token ids must be one-dimensional, got shape (2, 2)"),
    Row("api: step NaN", lambda b, t, m: _step(m, [float("nan")]), InputError, "token ids must be integers, got nan"),
    Row("api: step 2**70", lambda b, t, m: _step(m, [2 ** 70]), InputError, "token id 1180591620717411303424 is outside the vocabulary"),
    Row("api: step 'a'", lambda b, t, m: _step(m, ["a"]), InputError, "token ids must be integers, got 'a'"),
    Row("api: step 2.7 (no silent truncation)", lambda b, t, m: _step(m, [2.7]), InputError, "token ids must be integers, got 2.7"),
    Row("api: step with two ids for one row", lambda b, t, m: _step(m, [1, 2]), InputError, "step got 2 tokens for a batch of 1"),
    Row("api: step with a bool", lambda b, t, m: _step(m, [True]), InputError, "token ids must be integers, got True"),
    Row("api: generate with a 2-D array", lambda b, t, m: m.generate(np.array([[1, 2], [3, 4]])), InputError,
        "token ids must be one-dimensional, got shape (2, 2)"),
    Row("api: generate with a nested list", lambda b, t, m: m.generate([[1, 2], [3, 4]]), InputError,
        "token ids must be integers, got [1, 2]"),
    Row("api: generate with bytes", lambda b, t, m: m.generate(b"Once"), InputError, "a prompt must be text or a sequence"),
    Row("api: generate text with a lone surrogate", lambda b, t, m: m.generate("Once \udcff upon"), InputError,
        "not valid UTF-8"),
    Row("api: generate max_draft=-3", lambda b, t, m: m.generate(PROMPT, mode="speculative", max_draft=-3), InputError,
        "max_draft must be an integer >= 1"),
    Row("api: generate unknown mode", lambda b, t, m: m.generate(PROMPT, mode="turbo"), InputError, "unknown mode 'turbo'"),
    Row("api: generate temperature inf", lambda b, t, m: m.generate(PROMPT, temperature=math.inf), InputError,
        "temperature must be a finite number"),
    Row("api: calibrate holdout nan", lambda b, t, m: _calibrate(b, holdout=math.nan), InputError,
        "--holdout must be a number in (0, 1)"),
    Row("api: calibrate rank 0", lambda b, t, m: _calibrate(b, rank=0), InputError, "--rank must be an integer >= 1"),
    Row("api: evaluate timing_samples -1", lambda b, t, m: _evaluate(b, timing_samples=-1), InputError,
        "--timing-samples must be an integer >= 0"),
]


def _nan_threshold(bundle: Path) -> None:
    text = (bundle / "exit_policy.json").read_text().replace('"threshold": 0.8', '"threshold": NaN')
    _rewrite_attached(bundle, "exit_policy.json", text.encode())


def _rewrite_attached(bundle: Path, name: str, data: bytes) -> None:
    """Replace an attached file and fix up its size and digest in the manifest (a consistent forgery)."""
    (bundle / name).write_bytes(data)
    manifest = Manifest.load(bundle)
    key = next(k for k, v in manifest.attachments.items() if v.file == name)
    manifest.attach(key, bundle, name).save(bundle)


def _external_policy_source(src: Path) -> None:
    (src.parent / "outside.onnx").write_bytes((src / "exit_head.onnx").read_bytes())
    put_policy(src, {**RULE_POLICY, "decision": "folded", "head_file": "../outside.onnx"})


def _calibrate(bundle, **kwargs):
    from adainfer.calib.calibrate import calibrate
    from adainfer.paths import DEFAULT_CALIB_DATA

    calibrate(bundle, DEFAULT_CALIB_DATA, progress=False, **kwargs)


def _evaluate(bundle, **kwargs):
    from adainfer.calib.evaluate import evaluate
    from adainfer.paths import DEFAULT_CALIB_DATA

    evaluate(bundle, DEFAULT_CALIB_DATA, **kwargs)


# ------------------------------------------------------------------ running a row


@pytest.fixture(scope="module")
def bases(stories_bundle, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    plain = root / "plain"
    shutil.copytree(stories_bundle, plain)
    policy = root / "policy"
    shutil.copytree(stories_bundle, policy)
    put_policy(policy, RULE_POLICY)
    return {"plain": plain, "policy": policy}


@pytest.fixture(scope="module")
def shared_model(bases):
    return rt.load(bases["plain"])


def _argv(call: list, bundle: Path, scratch: Path) -> list:
    out = []
    for item in call:
        if isinstance(item, str):
            item = item.replace("{B}", str(bundle)).replace("{T}", str(scratch))
        out.append(item)
    return out


def _run_in_process(capsys, argv: list) -> tuple[int, str, str]:
    from adainfer.cli import main as adainfer_main
    from adainfer.exporter.cli import main as export_main

    main = {"adainfer": adainfer_main, "adainfer-export": export_main}[argv[0]]
    capsys.readouterr()
    try:
        rc = main(argv[1:])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _run_process(argv: list, close_stdout: bool, env: dict) -> tuple[int, str, str]:
    module = {"adainfer": "adainfer.cli", "adainfer-export": "adainfer.exporter.cli"}[argv[0]]
    args = [sys.executable, "-m", module] + [a if isinstance(a, bytes) else a.encode() for a in argv[1:]]
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=None if close_stdout else subprocess.PIPE,
                          stderr=subprocess.PIPE, env={**os.environ, **env}, timeout=120,
                          preexec_fn=(lambda: os.close(1)) if close_stdout else None)
    decode = lambda b: (b or b"").decode("utf-8", "replace")  # noqa: E731
    return proc.returncode, decode(proc.stdout), decode(proc.stderr)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input(row: Row, bases, shared_model, tmp_path, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bundle = bases[row.base]
    if row.setup is not None:
        bundle = tmp_path / "bundle"
        shutil.copytree(bases[row.base], bundle, symlinks=True)
        row.setup(bundle, scratch)
    before = snapshot(bundle)
    listing = sorted(p.name for p in bundle.parent.iterdir())
    if callable(row.call):
        assert isinstance(row.expect, type) and issubclass(row.expect, AdainferError)
        model = shared_model if row.setup is None else None
        with pytest.raises(AdainferError) as info:
            row.call(bundle, scratch, model)
        assert type(info.value) is row.expect or isinstance(info.value, row.expect), repr(info.value)
        message = str(info.value)
        assert "\n" not in message and row.fragment in message, message
    else:
        argv = _argv(row.call, bundle, scratch)
        if row.process:
            rc, out, err = _run_process(argv, row.close_stdout, row.env)
        else:
            rc, out, err = _run_in_process(capsys, argv)
        assert "Traceback" not in err and "Traceback" not in out, err
        assert rc == row.expect, (rc, out, err)
        if row.expect < 0:  # killed by a signal: no message; the next write removes what it left
            from adainfer.atomic import remove_stale

            remove_stale(bundle)
        elif row.expect == 0:
            assert row.fragment in out, out
        else:
            lines = one_line(err)
            assert len(lines) == 1, err
            assert ": error: " in lines[0] and row.fragment in lines[0], lines[0]
    assert snapshot(bundle) == before, "the bundle changed"
    assert sorted(p.name for p in bundle.parent.iterdir()) == listing, "something was left beside the bundle"
    assert not (scratch.parent / MARKER).exists() and not (scratch / MARKER).exists(), "untrusted code ran"


def test_table_size():
    """The README states this count; keep them equal when adding rows."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert len(ROWS) >= 80
    assert f"{len(ROWS)} hostile inputs" in readme
