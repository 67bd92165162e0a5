"""Early exit on a real model (SmolLM2-135M-Instruct): label head, internal classifiers, and the
runtime reproducing the calibrated exits row for row. Small row counts: one shared bundle."""

import os
import shutil

import numpy as np
import pytest

import adainfer.runtime as rt
from adainfer.calib.calibrate import calibrate
from adainfer.calib.data import load_dataset
from adainfer.calib.evaluate import evaluate
from adainfer.calib.head_graphs import label_head
from adainfer.runtime.early_exit import ExitDecider, load_policy, predict, trace
from adainfer.runtime.sessions import make_session
from conftest import ROOT

SST2 = next((d / "sst2_dev.tsv" for d in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data")
             if (d / "sst2_dev.tsv").exists()), ROOT.parent / "shared" / "data" / "sst2_dev.tsv")
LABEL_IDS = [3524, 2731]  # " negative", " positive" (SST-2 labels 0, 1) in SmolLM2's tokenizer


def linked_copy(src, dst):
    """A copy of a bundle made of hard links (calibration replaces files, never writes into them);
    external-data files are copied, since `onnx.load` refuses hard-linked external data."""
    shutil.copytree(src, dst, copy_function=lambda a, b: (shutil.copy2 if str(a).endswith(".bin") else os.link)(a, b))
    return dst


def test_label_head_equals_full_head_on_label_words(smollm2_bundle, tmp_path):
    model = rt.load(smollm2_bundle)
    m = model.manifest
    ids = model.encode("Review: a gorgeous, witty, seductive movie.\nSentiment:")
    hidden = np.stack([h[-3:] for h in trace(model, ids)[1:]]).reshape(-1, m.hidden_size)  # every layer, 3 positions
    label_head(smollm2_bundle / m.graphs["final_head"].file, tmp_path / "lh.onnx", m.vocab_size, LABEL_IDS)
    logits, top1, prob, gap = make_session(tmp_path / "lh.onnx").run(
        ["label_logits", "top1_id", "top1_prob", "gap"], {"hidden_states": hidden})
    full = model.final_logits(hidden)[:, LABEL_IDS]
    assert np.max(np.abs(logits - full)) < 1e-4
    assert np.array_equal(top1, np.asarray(LABEL_IDS)[full.argmax(-1)])
    z = np.exp(full - full.max(-1, keepdims=True))
    p = np.sort(z / z.sum(-1, keepdims=True), -1)
    assert np.max(np.abs(prob - p[:, -1])) < 1e-4 and np.max(np.abs(gap - (p[:, -1] - p[:, -2]))) < 1e-4


@pytest.fixture(scope="module")
def probes_bundle(smollm2_bundle, tmp_path_factory):
    if not SST2.exists():
        pytest.fail(f"{SST2} is missing")
    bundle = linked_copy(smollm2_bundle, tmp_path_factory.mktemp("calib-real") / "b")
    report = calibrate(bundle, SST2, task="sst2", shots=1, limit=48, label="gold", variant="probes", progress=False,
                       stratify=True, margin_z=0.0, max_accuracy_drop=0.2)
    return bundle, report


def test_probe_graph_equals_sklearn_and_runtime_reproduces_exits(probes_bundle):
    bundle, report = probes_bundle
    model = rt.load(bundle)
    policy = load_policy(model)
    assert policy.decision == "probe" and policy.answer == "probe" and policy.label_token_ids == LABEL_IDS
    assert report["chosen"]["answer"] == "probe"
    # the calibration checked the ONNX probes against scikit-learn on every held-out row and layer
    held = report["rows"]["held_out"]
    assert report["probes_onnx"] == {"examples": held * len(policy.layers), "mismatches": 0}
    # the early-exit runtime, prompt by prompt, exits and answers as the calibration simulated
    result = evaluate(bundle, SST2, task="sst2", shots=1, skip=48, limit=16, timing_samples=16, stratify=True)
    assert result["timed_prompts"] == 16
    assert result["runtime_exits_match_simulation"] == 1.0 and result["runtime_answers_match_simulation"] == 1.0
    assert result["answers_with"] == "probe" and result["accuracy_full"] is not None
    assert result["calibration_peak_memory_mib"] > 0


def test_runtime_reproduces_calibrated_exits_row_for_row(probes_bundle):
    """Independent of evaluate(): the simulated exits of the calibration's own held-out rows."""
    from adainfer.calib import probes as probe_mod
    from adainfer.calib.features import collect
    from adainfer.calib.simulate import exit_layers

    bundle, report = probes_bundle
    model = rt.load(bundle)
    policy = load_policy(model)
    decider = ExitDecider(model, policy)
    data = load_dataset(SST2, "sst2", model.tokenizer.encode, shots=1, limit=48, stratify=True)
    table = collect(model, data, label_head=bundle / policy.label_head_file, progress=False)
    # scores straight from the runtime's probe graph, thresholds from the policy
    L = model.num_layers
    conf = np.full((len(table.gap), L), -np.inf)
    for layer in policy.layers:
        conf[:, layer - 1] = decider.probe(layer, table.hidden[:, layer - 1])[1]
    per_layer = np.full(L, np.inf)
    per_layer[[l - 1 for l in policy.layers]] = policy.layer_thresholds
    evaluated = np.array([policy.evaluates(l, L) for l in range(1, L + 1)])
    want = exit_layers(conf, per_layer, evaluated)
    assert report["chosen"]["exit_histogram"] is not None
    got = [predict(model, e.ids, decider).exit_layer for e in data.examples]
    assert got == want.tolist()
    assert probe_mod.NEVER > 1.0
