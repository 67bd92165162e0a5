"""Spans of blocks in bundles and in the chain: the same numbers as the blocks, fewer session calls."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import adainfer.runtime as rt
from adainfer.errors import BundleError
from adainfer.exporter.span_writer import add_spans, check_span
from adainfer.manifest import Manifest
from adainfer.runtime.exit_policy import ExitPolicy
from adainfer.runtime.segments import cover, policy_stops, span_ranges

PROMPT = "Once upon a time"
BACKENDS = ("cpu", "cpu-iobinding")


def prefill(model, ids):
    """Logits at every prompt position and every layer's keys and values after the prompt."""
    from adainfer.runtime import chain

    state = model.new_state(1)
    input_ids = np.asarray([ids], dtype=np.int64)
    run = chain.run_layers(model.backend, input_ids, state, np.ones_like(input_ids))
    logits = chain.all_logits(model.backend, run)
    kv = [tuple(np.array(a) for a in state.layer(i)) for i in range(model.num_layers)]
    state.close()
    return logits, kv


def test_cover_takes_the_longest_span_between_stops_and_blocks_elsewhere():
    spans = [(0, 4), (0, 1), (2, 3)]
    assert cover(5, [], spans) == [(0, 4)]
    assert cover(5, [2, 4], spans) == [(0, 1), (2, 3), (4, 4)]
    assert cover(5, [1], spans) == [(0, 0), (1, 1), (2, 3), (4, 4)]
    assert cover(5, [], []) == [(i, i) for i in range(5)]
    assert span_ranges(5, [2, 4]) == [(0, 1), (2, 3)]
    assert span_ranges(30, []) == [(0, 29)]
    assert span_ranges(5, [1, 2, 3, 4]) == []
    rule = ExitPolicy(decision="rule", features=["gap"], threshold=2.0, min_layer=2, stride=2)
    assert policy_stops(rule, 5) == {2, 4}
    hidden = ExitPolicy(decision="rule", features=["cos_prev"], threshold=2.0, min_layer=3, stride=1, head="none")
    assert policy_stops(hidden, 5) == {2, 3, 4}  # the previous layer's hidden state is read too


@pytest.mark.parametrize("backend", BACKENDS)
def test_span_gives_the_logits_and_every_layer_kv_of_the_chained_blocks(stories_bundle, backend):
    manifest = Manifest.load(stories_bundle)
    assert manifest.spans == {(0, manifest.num_layers - 1): "span_00_04"}
    with_spans, without = rt.load(stories_bundle, backend=backend), rt.load(stories_bundle, backend=backend, spans=False)
    ids = with_spans.encode(PROMPT)
    logits_a, kv_a = prefill(with_spans, ids)
    logits_b, kv_b = prefill(without, ids)
    assert with_spans.session_calls["span_00_04"] == 1 and with_spans.session_calls["block_00"] == 0
    assert without.session_calls["span_00_04"] == 0 and without.session_calls["block_04"] == 1
    assert np.max(np.abs(logits_a - logits_b)) <= 1e-5
    for (ka, va), (kb, vb) in zip(kv_a, kv_b):
        assert ka.shape == kb.shape == (1, manifest.num_kv_heads, len(ids), manifest.head_dim)
        assert np.max(np.abs(ka - kb)) <= 1e-5 and np.max(np.abs(va - vb)) <= 1e-5


def test_the_exporters_full_step_check_refuses_a_full_step_that_reads_the_wrong_row(stories_bundle, tmp_path):
    import onnx

    from adainfer.errors import ExportError
    from adainfer.exporter.span_writer import check_full_step

    manifest = Manifest.load(stories_bundle)
    assert check_full_step(stories_bundle, manifest) <= 1e-4
    out = tmp_path / "b"
    shutil.copytree(stories_bundle, out)
    model = onnx.load(str(out / "full_step.onnx"), load_external_data=False)
    last = next(t for t in model.graph.initializer if t.name == "full_step/last_position")
    last.CopyFrom(onnx.numpy_helper.from_array(np.array(0, dtype=np.int64), last.name))  # the first row, not the last
    onnx.save(model, str(out / "full_step.onnx"))
    with pytest.raises(ExportError, match="full_step differs from embed -> span -> head"):
        check_full_step(out, manifest)


def test_the_exporters_fill_check_refuses_a_merged_kv_fill_of_the_wrong_layers(stories_bundle, tmp_path):
    """A merged kv fill gives each layer what its kv_fill graph gives; one built from layers 2-4 but named as
    layers 1-3 (every layer's keys from the next layer's projections) is refused."""
    from adainfer.errors import ExportError
    from adainfer.exporter.span_writer import add_spans, check_fill_spans
    from adainfer.exporter.spans import merge_fills

    out = tmp_path / "b"
    shutil.copytree(stories_bundle, out)
    manifest = add_spans(out, Manifest.load(out), [], fills=[(1, 4)])  # checked on the way
    assert manifest.fill_spans == {(1, 4): "kv_fill_01_04"}
    assert check_fill_spans(out, out, manifest, [(1, 4)]) <= 1e-5
    merge_fills(out, [f"kv_fill_{i:02d}.onnx" for i in (2, 3, 4, 4)], 1, "kv_fill_01_04.onnx")
    with pytest.raises(ExportError, match="kv_fill_01_04 differs from its layers' kv_fill graphs"):
        check_fill_spans(out, out, manifest, [(1, 4)])


def test_merged_graphs_run_each_blocks_projections_as_one_matmul(stories_bundle, tmp_path):
    """The full-depth span, the full step and a merged kv fill fuse every block's q/k/v and gate/up (every layer's
    k/v in a fill) into one MatMul on a Concat of the blocks' own weight initializers (folded at load: no new
    weights in the file); the exporter's checks against the unmerged graphs (within 1e-5) still hold."""
    import onnx

    out = tmp_path / "b"
    shutil.copytree(stories_bundle, out)
    manifest = add_spans(out, Manifest.load(out), [], fills=[(1, 4)])
    L = manifest.num_layers

    def concats(name: str) -> list:
        model = onnx.load(str(out / manifest.graphs[name].file), load_external_data=False)
        inits = {t.name for t in model.graph.initializer}
        found = [list(n.input) for n in model.graph.node if n.op_type == "Concat" and n.name.endswith("_fused_weight")]
        assert all(i in inits for inputs in found for i in inputs)
        return sorted(len(inputs) for inputs in found)

    for name in (manifest.spans[(0, L - 1)], manifest.full_step):
        assert concats(name) == [2] * L + [3] * L, name
    assert concats("kv_fill_01_04") == [2] * 4
    assert check_span(out, out, manifest, 0, L - 1) <= 1e-5


def test_the_exporters_span_check_measures_the_span_against_its_blocks(stories_bundle):
    manifest = Manifest.load(stories_bundle)
    assert check_span(stories_bundle, stories_bundle, manifest, 0, 4) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_depth_generation_is_token_identical_with_one_call_per_step(stories_bundle, backend):
    """cpu: the full step (embedding, blocks and head in one graph); cpu-iobinding: embed -> span -> head."""
    runs = {}
    for spans in (True, False):
        model = rt.load(stories_bundle, backend=backend, spans=spans)
        g = model.generate(PROMPT, max_new_tokens=24, stop_at_eos=False)
        runs[spans] = (g.tokens, {k: v for k, v in model.session_calls.items() if v})
        loaded = model.sessions.loaded()
        if spans:  # the blocks the span covers are never loaded (nor, with the full step, anything else)
            assert not [n for n in loaded if n.startswith("block_")], loaded
            if backend == "cpu":
                assert loaded == ["full_step"]
        model.close()
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 24
    steps = 24  # the prompt and 23 decode steps
    if backend == "cpu":
        assert runs[True][1] == {"full_step": steps}
    else:
        assert runs[True][1] == {"embed": steps, "span_00_04": steps, "final_head": steps}
    assert runs[False][1] == {"embed": steps, "final_head": steps, **{f"block_{i:02d}": steps for i in range(5)}}


@pytest.fixture(scope="module")
def policy_spans_bundle(stories_bundle, tmp_path_factory):
    """The stories bundle with the spans between layers 2 and 4 (a policy evaluating after blocks 2 and 4)."""
    out = tmp_path_factory.mktemp("spans") / "stories"
    shutil.copytree(stories_bundle, out)
    manifest = Manifest.load(out)
    policy = ExitPolicy(decision="rule", features=["gap"], threshold=2.0, min_layer=2, stride=2)  # gap < 2: never stops
    add_spans(out, manifest, span_ranges(manifest.num_layers, policy_stops(policy, manifest.num_layers)))
    return out, policy


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_exit_runs_the_spans_between_evaluated_layers(policy_spans_bundle, backend):
    bundle, policy = policy_spans_bundle
    assert sorted(Manifest.load(bundle).spans) == [(0, 1), (0, 4), (2, 3)]
    model = rt.load(bundle, backend=backend)
    g = model.generate(PROMPT, max_new_tokens=8, mode="early-exit", policy=policy, stop_at_eos=False)
    calls = {k: v for k, v in model.session_calls.items() if v}
    steps = 7  # after the prompt (full depth: one span_00_04 call)
    # the prompt at full depth: the full step on cpu, embed -> span_00_04 -> head on cpu-iobinding
    prompt = {"full_step": 1} if backend == "cpu" else {"span_00_04": 1}
    heads = steps if backend == "cpu" else steps + 1
    assert calls == {**prompt, "embed": heads, "span_00_01": steps, "span_02_03": steps, "block_04": steps,
                     "exit_head": 2 * steps, "final_head": heads}
    assert g.layers_per_token == [5] * 8
    plain = rt.load(bundle, backend=backend, spans=False).generate(PROMPT, max_new_tokens=8, stop_at_eos=False)
    assert g.tokens == plain.tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_exit_and_speculative_keep_working_with_spans(stories_bundle, backend):
    forced = ExitPolicy.forced(2)
    out = {}
    for spans in (True, False):
        model = rt.load(stories_bundle, backend=backend, spans=spans)
        e = model.generate(PROMPT, max_new_tokens=10, mode="early-exit", policy=forced, stop_at_eos=False)
        s = model.generate(PROMPT, max_new_tokens=10, mode="speculative", policy=forced, stop_at_eos=False)
        f = model.generate(PROMPT, max_new_tokens=10, stop_at_eos=False)
        out[spans] = (e.tokens, e.layers_per_token, s.tokens, f.tokens)
    assert out[True] == out[False]
    assert out[True][2] == out[True][3]  # speculative is lossless: the full-depth greedy tokens
    assert out[True][1][1:] == [2] * 9


def test_a_span_graph_with_a_wrong_interface_is_refused(stories_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(stories_bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    span = data["graphs"].pop("span_00_04")
    data["graphs"]["span_00_05"] = span  # past the last block
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="span_00_05 is not a span"):
        rt.load(out)
    data["graphs"].pop("span_00_05")
    span["inputs"] = [t for t in span["inputs"] if t["name"] != "past_key_03"]
    data["graphs"]["span_00_04"] = span
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="span_00_04.inputs has no past_key_03"):
        rt.load(out)


def test_a_full_step_with_a_wrong_interface_is_refused(stories_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(stories_bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    full = data["graphs"]["full_step"]
    full["inputs"] = [t for t in full["inputs"] if t["name"] != "past_key_03"]
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="full_step.inputs has no past_key_03"):
        rt.load(out)


def test_spans_do_not_change_the_manifest_digest(stories_bundle):
    manifest = Manifest.load(stories_bundle)
    from adainfer.exporter.span_writer import without_spans

    assert without_spans(manifest).digest() == manifest.digest()


def test_smollm2_full_depth_generation_is_token_identical_with_and_without_spans(smollm2_bundle):
    manifest = Manifest.load(smollm2_bundle)
    assert manifest.spans == {(0, 29): "span_00_29"}
    # the span holds no weights of its own: the blocks' live once, in the shared file both reference
    assert (smollm2_bundle / "span_00_29.onnx").stat().st_size < 1 << 20
    question = "Once upon a time, in a small village,"
    runs = {}
    for spans in (True, False):
        model = rt.load(smollm2_bundle, threads=2, spans=spans)
        ids = model.encode(question)
        logits, kv = prefill(model, ids)
        g = model.generate(ids, max_new_tokens=32, stop_at_eos=False)
        runs[spans] = (g.tokens, logits, kv, dict(model.session_calls))
        model.close()
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 32
    assert np.max(np.abs(runs[True][1] - runs[False][1])) <= 1e-5
    for (ka, va), (kb, vb) in zip(runs[True][2], runs[False][2]):
        assert np.max(np.abs(ka - kb)) <= 1e-5 and np.max(np.abs(va - vb)) <= 1e-5
    # generation: the full step (prompt + 32 steps); `prefill` above: the span (run_layers)
    assert runs[True][3]["full_step"] == 32 and runs[True][3]["span_00_29"] == 1
    assert not any(runs[True][3][f"block_{i:02d}"] for i in range(30))
    assert runs[False][3]["span_00_29"] == 0 and runs[False][3]["full_step"] == 0 and all(runs[False][3][f"block_{i:02d}"] == 33 for i in range(30))


def test_calibration_adds_the_policys_spans_in_one_staged_update(stories_bundle, tmp_path):
    """`calibrate._write` path: the spans go into the staged update beside the policy; the live bundle is untouched until
    the swap, the new spans point into the bundle's shared weight file (no weight bytes added), the digest is unchanged."""
    from adainfer.atomic import staged_update
    from adainfer.calib.calibrate import _add_policy_spans

    bundle = tmp_path / "b"
    shutil.copytree(stories_bundle, bundle)
    before = Manifest.load(bundle)
    weights = (bundle / "shared_weights.bin").stat().st_size
    policy = ExitPolicy(decision="rule", features=["gap"], threshold=2.0, min_layer=3, stride=10)  # evaluates layer 3
    with staged_update(bundle) as update:
        manifest = _add_policy_spans(bundle, before, policy, update.dir)
        assert sorted(Manifest.load(bundle).spans) == [(0, 4)]  # not yet live
    after = Manifest.load(bundle)
    assert sorted(after.spans) == [(0, 2), (0, 4), (3, 4)] == sorted(manifest.spans)
    assert after.fill_spans == {(3, 4): "kv_fill_03_04"}  # an exit after 3 blocks fills blocks 4-5 in one call
    assert after.digest() == before.digest()
    assert (bundle / "shared_weights.bin").stat().st_size == weights and (bundle / "span_00_02.onnx").stat().st_size < 64 << 10
    model = rt.load(bundle)
    g = model.generate(PROMPT, max_new_tokens=4, mode="early-exit", policy=policy, stop_at_eos=False)
    assert {k: v for k, v in model.session_calls.items() if v} == {  # the prompt at full depth: the full step
        "full_step": 1, "embed": 3, "span_00_02": 3, "exit_head": 3, "span_03_04": 3, "final_head": 3}
    assert g.tokens == rt.load(bundle, spans=False).generate(PROMPT, max_new_tokens=4, stop_at_eos=False).tokens


def test_a_converted_bundle_gets_its_span_merged_from_the_converted_blocks(stories_hf, stories_bundle, tmp_path):
    import onnx

    from adainfer.exporter.convert import convert_bundle

    manifest = convert_bundle(stories_hf, stories_bundle, tmp_path / "int4", "int4")
    out = tmp_path / "int4"
    assert manifest.spans == {(0, 4): "span_00_04"} and manifest.graphs["span_00_04"].precision == "int4"
    ops = [n.op_type for n in onnx.load(str(out / "span_00_04.onnx"), load_external_data=False).graph.node]
    block_ops = [n.op_type for n in onnx.load(str(out / "block_00.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 5 * block_ops.count("MatMulNBits") > 0
    runs = [rt.load(out, spans=s).generate(PROMPT, max_new_tokens=12, stop_at_eos=False).tokens for s in (True, False)]
    assert runs[0] == runs[1]
