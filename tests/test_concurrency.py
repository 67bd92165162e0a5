"""One bundle, many generations at once: 8 threads sharing one loaded model over all three generation
modes, and a pool of 2 processes sharing one bundle on disk. Every result must equal the same
generation run alone (each generation owns its KV cache; the decider and sessions are shared)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import shutil
import threading

import pytest

import adainfer.runtime as rt
from conftest import make_classifier, put_policy, run_in_threads

#: (prompt, options): greedy and seeded sampling, over the three modes
JOBS = [
    ("Once upon a time", dict(mode="full")),
    ("The little dog", dict(mode="full", temperature=0.9, top_p=0.9, seed=7)),
    ("Once upon a time", dict(mode="early-exit")),
    ("Lily wanted to", dict(mode="early-exit", temperature=1.1, seed=3)),
    ("Once upon a time", dict(mode="speculative")),
    ("Tom and his mom", dict(mode="speculative", temperature=0.8, seed=11)),
    ("The sun was", dict(mode="speculative", max_draft=2)),
    ("One day, a bird", dict(mode="early-exit", temperature=0.7, top_p=0.8, seed=5)),
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def bundle(stories_bundle, tmp_path_factory):
    """stories260K with a classifier exit that fires often (gap >= ~0.5), so the modes differ."""
    path = tmp_path_factory.mktemp("concurrency") / "bundle"
    shutil.copytree(stories_bundle, path)
    put_policy(path, {"decision": "classifier", "features": ["gap", "top_prob"], "threshold": 0.5, "head": "full",
                      "classifier_file": "classifier.onnx", "score_output": 1, "score_column": 1},
               {"classifier.onnx": make_classifier(2)}, attach=("classifier.onnx",))
    return path


def generate_all(bundle: str, order: list) -> dict:
    """Run the JOBS in `order` in this process (also the process pool's worker)."""
    model = rt.load(bundle)
    out = {}
    for index in order:
        prompt, options = JOBS[index]
        g = model.generate(prompt, max_new_tokens=NEW_TOKENS, stop_at_eos=False, **options)
        out[index] = (g.tokens, g.layers_per_token)
    return out


def test_eight_threads_over_all_modes(bundle):
    model = rt.load(bundle)
    expected = generate_all(str(bundle), list(range(len(JOBS))))
    assert len({tuple(tokens) for tokens, _ in expected.values()}) >= 6  # different outputs, so mixing would show
    assert any(min(layers[1:]) < 5 for _, layers in expected.values())  # early exits really happen
    rounds = 2
    barrier = threading.Barrier(len(JOBS))
    results: dict = {}
    errors: list = []

    def worker(index: int) -> None:
        prompt, options = JOBS[index]
        try:
            barrier.wait()
            got = []
            for r in range(rounds):  # alternate the two APIs, so the threads interleave differently
                if (index + r) % 2:
                    events = list(model.stream(prompt, max_new_tokens=NEW_TOKENS, stop_at_eos=False, **options))
                    got.append(([e.token for e in events], [e.layers for e in events]))
                else:
                    g = model.generate(prompt, max_new_tokens=NEW_TOKENS, stop_at_eos=False, **options)
                    got.append((g.tokens, g.layers_per_token))
            results[index] = got
        except BaseException as exc:  # reported below
            errors.append(exc)

    run_in_threads(worker, len(JOBS), timeout=300)
    assert not errors, errors
    for index, want in expected.items():
        assert results[index] == [want] * rounds, JOBS[index]


def test_two_processes_share_one_bundle_on_disk(bundle):
    expected = generate_all(str(bundle), list(range(len(JOBS))))
    orders = [list(range(len(JOBS))), list(reversed(range(len(JOBS))))]
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(generate_all, [str(bundle)] * 2, orders))
    for got in results:
        assert {i: (list(t), list(l)) for i, (t, l) in got.items()} == \
            {i: (list(t), list(l)) for i, (t, l) in expected.items()}
