"""Spans: consecutive block graphs merged into one (exporter/spans.py) compute exactly what the chained blocks do;
the bench's span contender decodes the chain's tokens; forced exits of a precision variant get their own ratios."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from adainfer.bench import report
from adainfer.exporter import export_model
from adainfer.exporter.spans import merge_blocks, span_name
from adainfer.manifest import Manifest
from conftest import tiny_model


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_a_span_equals_its_blocks_run_one_after_another(tmp_path):
    """Blocks 1..2 of a 3-layer Llama (fused blocks, shared weights) as one span, on a decode step with a cache:
    hidden state and every present key/value identical to the blocks chained, inputs and outputs named per block."""
    out = tmp_path / "b"
    export_model(tiny_model("llama"), out, progress=False)
    m = Manifest.load(out)
    assert m.num_layers == 3
    files = [m.graphs[m.block_name(i)].file for i in (1, 2)]
    span = _session(merge_blocks(out, files, 1, span_name(1, 2) + ".onnx"))
    assert [i.name for i in span.get_inputs()] == ["hidden_states", "position_ids", "attention_mask", "past_key_01",
                                                   "past_value_01", "past_key_02", "past_value_02"]
    assert [o.name for o in span.get_outputs()] == ["hidden_states_out", "present_key_01", "present_value_01",
                                                    "present_key_02", "present_value_02"]
    rng = np.random.default_rng(0)
    past = 5
    hidden = rng.standard_normal((2, 1, m.hidden_size)).astype(np.float32)
    position = np.array([[past], [past - 1]], np.int64)
    mask = np.ones((2, past + 1), np.int64)
    mask[1, 0] = 0  # a left-padded row
    caches = {i: [rng.standard_normal((2, m.num_kv_heads, past, m.head_dim)).astype(np.float32) for _ in range(2)]
              for i in (1, 2)}
    feeds = {"hidden_states": hidden, "position_ids": position, "attention_mask": mask}
    for i, (k, v) in caches.items():
        feeds[f"past_key_{i:02d}"], feeds[f"past_value_{i:02d}"] = k, v
    got = span.run(None, feeds)
    want, x = [], hidden
    for i, f in zip((1, 2), files):
        x, k, v = _session(out / f).run(None, {"hidden_states": x, "position_ids": position, "attention_mask": mask,
                                                "past_key": caches[i][0], "past_value": caches[i][1]})
        want += [k, v]
    np.testing.assert_array_equal(got[0], x)
    for g, w in zip(got[1:], want):
        np.testing.assert_array_equal(g, w)


def test_the_span_contender_decodes_the_chains_tokens(tmp_path):
    from adainfer.bench.contenders import build

    out = tmp_path / "b"
    export_model(tiny_model("llama"), out, progress=False)
    chain, span = build("chain_full", out, 1), build("span_fp32", out, 1)
    assert span.layers == chain.layers == 3 and (out / "span_00_02.onnx").is_file()
    tokens = {}
    for name, c in (("chain", chain), ("span", span)):
        state, token = c.prefill([5, 9, 30, 7])
        tokens[name] = [token]
        for _ in range(6):
            token = c.step(state, token)
            tokens[name].append(token)
    assert tokens["span"] == tokens["chain"]


def test_forced_exits_of_a_precision_variant_are_divided_by_its_own_full_depth():
    samples = {"chain_full": {"decode": [10.0, 12.0]}, "chain_exit@2": {"decode": [4.0, 6.0]},
               "chain_fp32-head8": {"decode": [8.0, 8.0]}, "chain_fp32-head8_exit@2": {"decode": [2.0, 4.0]}}
    r = report.ratios(samples, 8, [2])
    assert r["forced_exit_over_full_decode"]["2"]["median"] == (0.4 + 0.5) / 2
    assert r["forced_exit_over_own_full_decode"] == {"chain_fp32-head8": {"2": {"median": 0.375, "min": 0.25, "max": 0.5}}}
