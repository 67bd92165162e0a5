"""Prompt limits (refuse, or truncate on request keeping the most recent tokens) and one loaded
bundle serving several threads at once, each generation with its own KV cache."""

from __future__ import annotations

import json
import threading

import pytest

import adainfer.runtime as rt
from adainfer.errors import InputError
from adainfer.runtime.limits import fit_prompt
from conftest import run_in_threads

LONG = "Once upon a time there was a cat. " * 80  # ~ 800 tokens > 512 positions


@pytest.fixture(scope="module")
def model(stories_bundle):
    return rt.load(stories_bundle)


def test_fit_prompt_keeps_the_most_recent_tokens():
    ids = list(range(1, 21))
    assert fit_prompt(ids, 26, 6) == ids  # fits: unchanged
    with pytest.raises(InputError, match="prompt has 20 tokens, more than the model's 16 positions"):
        fit_prompt(ids, 16, 6)
    with pytest.raises(InputError, match="prompt of 20 tokens plus 6 new tokens exceeds the model's 20 positions"):
        fit_prompt(ids, 20, 6)
    assert fit_prompt(ids, 16, 6, "left") == ids[-10:]
    assert fit_prompt(ids, 16, 6, "left", bos_token_id=1) == [1] + ids[-9:]  # a leading BOS stays
    with pytest.raises(InputError, match="leave no room"):
        fit_prompt(ids, 16, 16, "left")


def test_generate_truncates_left_on_request(model):
    with pytest.raises(InputError, match="more than the model's 512 positions"):
        model.generate(LONG, max_new_tokens=8)
    full = model.tokenizer.encode(LONG)
    assert len(full) > 512
    result = model.generate(LONG, max_new_tokens=8, truncate="left")
    assert result.prompt_tokens == 512 - 8
    kept = [full[0]] + full[len(full) - (512 - 8) + 1:]
    assert kept[0] == model.manifest.bos_token_id
    assert result.tokens == model.generate(kept, max_new_tokens=8).tokens
    streamed = [e.token for e in model.stream(LONG, max_new_tokens=8, truncate="left")]
    assert streamed == result.tokens


def test_run_truncate_prompt_flag(stories_bundle, capsys):
    from adainfer.cli import main

    assert main(["run", str(stories_bundle), LONG, "--max-new-tokens", "4", "--truncate-prompt", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] == 508 and out["new_tokens"] == 4
    assert main(["run", str(stories_bundle), LONG, "--max-new-tokens", "4", "--truncate-prompt"]) == 0
    assert capsys.readouterr().out.strip()


JOBS = [
    ("Once upon a time", dict()),  # greedy
    ("The little dog", dict()),
    ("Once upon a time", dict(temperature=0.9, top_p=0.9, seed=7)),  # seeded sampling
    ("Lily wanted to", dict(temperature=1.2, seed=123)),
]


def test_threads_share_one_bundle_without_mixing_caches(model):
    expected = [model.generate(prompt, max_new_tokens=40, stop_at_eos=False, **kw).tokens for prompt, kw in JOBS]
    assert len({tuple(t) for t in expected}) == len(JOBS)  # different outputs, so mixing would show
    rounds = 3
    barrier = threading.Barrier(len(JOBS))
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        prompt, kw = JOBS[index]
        try:
            barrier.wait()
            got = []
            for r in range(rounds):  # alternate the two APIs, so the threads interleave steps
                if (index + r) % 2:
                    got.append([e.token for e in model.stream(prompt, max_new_tokens=40, stop_at_eos=False, **kw)])
                else:
                    got.append(model.generate(prompt, max_new_tokens=40, stop_at_eos=False, **kw).tokens)
            results[index] = got
        except BaseException as exc:  # reported below, with the thread's failure
            errors.append(exc)

    run_in_threads(worker, len(JOBS), timeout=120)
    assert not errors, errors
    for index, want in enumerate(expected):
        assert results[index] == [want] * rounds, JOBS[index]
