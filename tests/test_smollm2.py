"""The real model: SmolLM2-135M-Instruct, fetched as a GGUF (Q4_1), exported straight from it, against
transformers' own dequantization of the same file (`smollm2_hf`, float32).

One session-scoped export, shared by every test here (and by other test files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import adainfer.runtime as rt
from adainfer.errors import InputError
from adainfer.paths import HELDOUT_TEXT
from conftest import SMOLLM2_GGUF_NAME, SMOLLM2_GGUF_SHA256, run_cli

#: per-step logits, bundle vs transformers (float32 both; measured max 5.6e-5 over |logits| up to 39)
LOGIT_TOLERANCE = 5e-4
CAPITAL_QUESTION = "What is the capital of France?"
CAPITAL_ANSWER = "The capital of France is Paris."
GREEDY_PROMPTS = ["Once upon a time", "The theory of relativity says that", "def fibonacci(n):",
                  "Here are three tips for staying healthy:"]
CHATS = [
    CAPITAL_QUESTION,
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about the sea.\nMake it calm."}],
    [{"role": "user", "content": "Ünïcödé, emoji 🚀 and   spaces"}],
]


@pytest.fixture(scope="module")
def model(smollm2_bundle):
    return rt.load(smollm2_bundle)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_hf_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)


def _messages(chat):
    return [{"role": "user", "content": chat}] if isinstance(chat, str) else chat


def test_bundle_records_its_gguf_source_and_template(smollm2_bundle, smollm2_gguf, model):
    manifest = json.loads((smollm2_bundle / "manifest.json").read_text())
    assert manifest["source"] == {"format": "gguf", "file": SMOLLM2_GGUF_NAME, "size": 98_362_432,
                                  "sha256": SMOLLM2_GGUF_SHA256, "quantization": "Q4_1"}
    assert (manifest["num_layers"], manifest["hidden_size"], manifest["num_heads"], manifest["num_kv_heads"],
            manifest["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert "chat_template" in manifest["files"] and (smollm2_bundle / "chat_template.jinja").is_file()
    assert model.tokenizer.token_id("<|im_end|>") in model.manifest.eos_token_ids


def test_logits_equal_transformers_over_prefill_and_cached_decode(model, smollm2_hf):
    """32-token prefill, then 16 decode steps through the KV cache, each step's logits against
    transformers' logits at the same position."""
    ids = model.tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8")[:2000])[:48]
    assert len(ids) == 48
    with torch.no_grad():
        reference = smollm2_hf(torch.tensor([ids])).logits[0].numpy()
    state, logits = model.start([ids[:32]])
    steps = [logits[0]]
    for token in ids[32:47]:
        steps.append(model.step(state, [token])[0])
    steps.append(model.step(state, [ids[47]])[0])
    diffs = [float(np.abs(got - reference[31 + i]).max()) for i, got in enumerate(steps)]
    assert len(diffs) == 17 and max(diffs) <= LOGIT_TOLERANCE, diffs
    assert [int(s.argmax()) for s in steps] == [int(r.argmax()) for r in reference[31:48]]


@pytest.mark.parametrize("chat", CHATS, ids=["question", "system", "multi-turn", "unicode"])
def test_chat_prompt_ids_equal_transformers_apply_chat_template(model, hf_tokenizer, chat):
    expected = hf_tokenizer.apply_chat_template(_messages(chat), add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert rt.conversation.prompt_ids(model, chat) == list(expected)
    rendered = hf_tokenizer.apply_chat_template(_messages(chat), add_generation_prompt=True, tokenize=False)
    assert rt.conversation.template_of(model).render(chat) == rendered


def _transformers_greedy(hf_model, ids, new_tokens=48) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS + [CAPITAL_QUESTION])
def test_greedy_48_tokens_equal_transformers(model, smollm2_hf, prompt):
    chat = prompt == CAPITAL_QUESTION
    ids = rt.conversation.prompt_ids(model, prompt) if chat else model.tokenizer.encode(prompt)
    expected = _transformers_greedy(smollm2_hf, ids)
    got = model.generate(ids, max_new_tokens=48).tokens
    assert got == expected
    if chat:  # transformers stops at <|im_end|> too
        assert expected[-1] == model.tokenizer.token_id("<|im_end|>") and len(expected) < 48
    else:
        assert len(expected) == 48


def test_chat_answers_the_capital_question(model):
    reply = rt.chat(model, CAPITAL_QUESTION)
    assert reply.text == CAPITAL_ANSWER
    assert reply.stop_reason == "eos" and reply.tokens[-1] == model.tokenizer.token_id("<|im_end|>")


def test_run_chat_on_the_command_line(smollm2_bundle):
    rc, out, err = run_cli("adainfer", "run", str(smollm2_bundle), "--chat", CAPITAL_QUESTION)
    assert rc == 0, err
    assert out == CAPITAL_ANSWER + "\n"
    rc, out, err = run_cli("adainfer", "run", str(smollm2_bundle), "--chat", CAPITAL_QUESTION, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["text"] == CAPITAL_ANSWER and result["stop_reason"] == "eos"


def test_chat_runs_with_torch_and_transformers_unimportable(smollm2_bundle):
    import subprocess
    import sys

    from test_runtime_is_light import BLOCKER

    code = BLOCKER + ("import sys; from adainfer.cli import main; "
                      "sys.exit(main(['run', sys.argv[1], '--chat', sys.argv[2], '--max-new-tokens', '16']))")
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_bundle), CAPITAL_QUESTION], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == CAPITAL_ANSWER + "\n"


def test_template_errors_are_input_errors(model):
    with pytest.raises(InputError, match="empty chat message"):
        rt.chat(model, "  ")
    with pytest.raises(InputError, match="chat message 0 must be a dict with 'role' and 'content'"):
        rt.chat(model, [{"content": "no role"}])
