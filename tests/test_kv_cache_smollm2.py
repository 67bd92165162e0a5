"""`--kv int8` on the real model (SmolLM2-135M-Instruct from its Q4_1 GGUF): perplexity within 1% of the float32
cache on held-out TinyStories and on AG News article text, a quarter of the bytes per token, and greedy text over
48 tokens on the 5 prompts of tests/test_smollm2.py (the chat question through the chat template) checked at every
step against the float32 cache's.

Why not "identical 48 greedy tokens on every prompt": float32's own top-2 gap falls to 0.015-0.082 logits on
every one of the 5 prompts within 48 tokens (0.0149 at step 6 of "The theory of relativity says that"), while the
int8 cache moves the logits by up to 2.3 (median 0.53; logits up to ~39). Measured with
`tools/kv_int8_greedy.py` (docs/quant/kv_int8_greedy.md): this bundle's greedy text equals float32's on 2 of 5
prompts and switches only at steps whose float32 gap is 0.048, 0.063, 0.069; no int8 scheme measured keeps all 5
(static scales with other margins or clipping: 0-2 of 5; a scale per token and head, which the fused kernel
cannot hold: 4 of 5, max error 0.96); a float16 cache (max error 0.019) does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import adainfer.runtime as rt
from adainfer.calib.data import read_rows
from adainfer.exporter import kv_cache, quality
from adainfer.exporter.kv_cache import convert_kv_bundle
from test_smollm2 import CAPITAL_QUESTION, GREEDY_PROMPTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from kv_int8_greedy import greedy  # noqa: E402  (the measurement's own greedy / teacher-forced loop)

AG_NEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news_test.csv"
#: the int8 cache's top-1 must be a token float32 rates within this of its best (logits), at every step; measured:
#: the int8 cache (per-channel, margin 1.2) picks another token only where float32's top-2 gap is 0.048-0.069
NEAR_TIE = 0.1
#: |int8 logit - float32 logit|, teacher-forced on float32's greedy text; measured: at most 2.29 on the 5 prompts
LOGIT_TOLERANCE = 3.0


@pytest.fixture(scope="module")
def kv8(smollm2_bundle, smollm2_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-kv8") / "kv8"
    return out, convert_kv_bundle(smollm2_bundle, out, model=smollm2_hf)  # refuses a failed quality check


def test_kv8_bytes_and_quality_on_tinystories(kv8):
    out, manifest = kv8
    kv = manifest.kv_cache
    assert (kv.bytes_per_token, kv.float32_bytes_per_token) == (11_520, 46_080)  # 2 x 30 layers x 3 heads x 64
    assert kv.scale_bytes == 46_080  # once per bundle: 0.25x per token, the scales add 1 token's float32 bytes
    q = kv.quality
    assert q["text"] == "tinystories_heldout.txt" and q["positions"] > 900
    assert q["perplexity_ratio"] <= 1.01 and q["top1_agreement"] >= kv_cache.THRESHOLDS[0]


def test_kv8_perplexity_on_ag_news_text(kv8, smollm2_bundle, smollm2_hf):
    out, manifest = kv8
    texts = [text for text, _, _ in read_rows(AG_NEWS, "agnews")[-16:]]
    seqs = quality.text_sequences(texts, out / "tokenizer.json", manifest.vocab_size, manifest.bos_token_id, 128,
                                  "ag_news_test.csv")
    reference = quality.torch_reference(smollm2_hf, seqs)
    float_cache = quality.measure(smollm2_bundle, seqs, reference)
    int8_cache = quality.measure(out, seqs, reference)
    assert float_cache["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert int8_cache["perplexity"] / float_cache["perplexity"] <= 1.01
    assert int8_cache["top1_agreement"] >= 0.95


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS + [CAPITAL_QUESTION])
def test_kv8_greedy_48_tokens_against_float32(kv8, smollm2_bundle, prompt):
    """Every one of float32's 48 greedy steps (the chat prompt through its template, to its end of turn), the int8
    cache teacher-forced on float32's tokens: logits within LOGIT_TOLERANCE, and the int8 top-1 always a token
    float32 itself rates within NEAR_TIE of its best; free-running, the int8 text equals float32's up to the first
    step where float32's top-2 gap is below NEAR_TIE (exact identity over 48 tokens: see the module docstring)."""
    out, _ = kv8
    fp32, int8 = rt.load(smollm2_bundle, threads=1), rt.load(out, threads=1)
    chat = prompt == CAPITAL_QUESTION
    ids = rt.conversation.prompt_ids(fp32, prompt) if chat else fp32.tokenizer.encode(prompt)
    stops = rt.conversation.stop_ids(fp32)
    tokens32, logits32 = greedy(fp32, ids, 48, stops)
    assert len(tokens32) == 48 or (chat and tokens32[-1] in stops)
    state, _ = int8.start([ids])
    assert state.keys[0].dtype == np.int8 and int8.manifest.kv_dtype == "int8"  # the runtime keeps the int8 cache
    state.close()
    _, forced8 = greedy(int8, ids, 48, stops, forced=tokens32)
    assert forced8.shape == logits32.shape
    assert np.abs(forced8 - logits32).max() <= LOGIT_TOLERANCE
    best = logits32.max(axis=1)
    picked = logits32[np.arange(len(tokens32)), forced8.argmax(axis=1)]  # float32's logit of the int8 top-1
    assert (best - picked).max() < NEAR_TIE, f"steps {np.flatnonzero(best - picked >= NEAR_TIE).tolist()}"
    tokens8, _ = greedy(int8, ids, 48, stops)
    top2 = np.sort(logits32, axis=1)[:, -2:]
    near = np.flatnonzero(top2[:, 1] - top2[:, 0] < NEAR_TIE)
    first_tie = int(near[0]) if len(near) else len(tokens32)
    assert tokens8[:first_tie] == tokens32[:first_tie]
