"""An 8-bit LM head ranking at 4 bits and re-scoring its best candidates at 8 (`exporter/head_refine.py`); the
calibration's label head cut from quantized heads (`calib/head_graphs.label_head`)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adainfer.errors import ExportError
from adainfer.exporter import quantize
from adainfer.exporter.head_refine import refine_heads, round_to_4_bits

K, VOCAB, BLOCK = 128, 2048, 32


def _eight_bit_head(rng, shape=("b", "s")) -> tuple[onnx.ModelProto, np.ndarray]:
    """(a graph x (*shape, K) -> logits (*shape, VOCAB) through an 8-bit MatMulNBits, its dequantized table (VOCAB, K))."""
    table = rng.integers(1, 256, (VOCAB, K), dtype=np.uint8)  # stored codes; 128 is zero
    scales = rng.uniform(0.001, 0.01, (VOCAB, K // BLOCK)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["logits"], name="head", domain="com.microsoft",
                            K=K, N=VOCAB, bits=8, block_size=BLOCK, accuracy_level=4)
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*shape, K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*shape, VOCAB])],
                              [numpy_helper.from_array(table.reshape(VOCAB, K // BLOCK, BLOCK), "B"),
                               numpy_helper.from_array(scales.reshape(-1), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    weights = (table.astype(np.float32) - 128).reshape(VOCAB, K // BLOCK, BLOCK) * scales[:, :, None]
    return model, weights.reshape(VOCAB, K)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_refined_logits_are_exact_for_the_candidates_and_4_bit_elsewhere():
    """Per position: the `candidates` best 4-bit logits are replaced by x @ (8-bit rows) in float (1e-4), every other
    logit is the 4-bit head's, capped at the lowest re-scored one; the argmax is the exact 8-bit table's, where the 4-bit head alone misses it."""
    rng = np.random.default_rng(0)
    model, weights = _eight_bit_head(rng)
    x = rng.normal(size=(3, 40, K)).astype(np.float32)
    exact = x @ weights.T
    refined = refine_heads(onnx.ModelProto.FromString(model.SerializeToString()), 64)
    assert [n.op_type for n in refined.graph.node] == ["MatMulNBits", "TopK", "GatherBlockQuantized", "Unsqueeze",
                                                       "MatMul", "Squeeze", "ReduceMin", "Min", "ScatterElements"]
    got = _run(refined, x)
    packed, steps = round_to_4_bits((numpy_helper.to_array(model.graph.initializer[0]).reshape(VOCAB, K)),
                                    numpy_helper.to_array(model.graph.initializer[1]).reshape(VOCAB, K // BLOCK), BLOCK)
    coarse_model = onnx.ModelProto.FromString(model.SerializeToString())
    del coarse_model.graph.initializer[:]
    coarse_model.graph.initializer.extend([numpy_helper.from_array(packed, "B"), numpy_helper.from_array(steps, "S")])
    for a in coarse_model.graph.node[0].attribute:
        if a.name == "bits":
            a.i = 4
    coarse = _run(coarse_model, x)
    top = np.argsort(-coarse, axis=-1, kind="stable")[..., :64]
    chosen = np.zeros(coarse.shape, dtype=bool)
    np.put_along_axis(chosen, top, True, axis=-1)
    assert np.abs(got - exact)[chosen].max() < 1e-4
    floor = np.where(chosen, got, np.inf).min(-1, keepdims=True)  # the tail never outranks a re-scored candidate
    assert np.array_equal(got[~chosen], np.minimum(coarse, floor)[~chosen])
    assert (coarse > floor)[~chosen].sum() >= 1 and (coarse < floor)[~chosen].sum() > 1000
    assert (got.argmax(-1) == exact.argmax(-1)).all()
    assert (coarse.argmax(-1) != exact.argmax(-1)).sum() >= 10  # what the re-scoring repairs (of 120 positions)


def test_round_to_4_bits_is_the_nearest_symmetric_grid_point():
    rng = np.random.default_rng(1)
    table = rng.integers(0, 256, (8, 64), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (8, 2)).astype(np.float32)
    packed, steps = round_to_4_bits(table, scales, 32)
    w = ((table.astype(np.float32) - 128).reshape(8, 2, 32) * scales[:, :, None])
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(8, 2, 32).astype(np.float32)
    decoded = (codes - 8) * steps.reshape(8, 2, 1)
    step = steps.reshape(8, 2, 1)
    assert np.allclose(step[..., 0], np.abs(w).max(-1) / 7)
    assert (np.abs(decoded - w) <= step / 2 + 1e-6).all()
    assert packed.shape == (8, 2, 16) and codes.min() >= 1  # -8 (code 0) is never needed: |w| <= 7 steps


def test_refinement_is_refused_without_an_8_bit_head_or_with_too_many_candidates(tmp_path):
    rng = np.random.default_rng(2)
    model, _ = _eight_bit_head(rng)
    with pytest.raises(ExportError, match=r"--head-refine takes 1\.\.2048 candidates \(the vocabulary\), got 4096"):
        refine_heads(model, 4096)
    for a in model.graph.node[0].attribute:
        if a.name == "bits":
            a.i = 4
    with pytest.raises(ExportError, match=r"--head-refine needs an 8-bit LM head \(--head-bits 8\); head has 0"):
        refine_heads(model, 64)
    for precision, head_bits in (("fp16", None), ("fp32", None), ("int4", 4), ("int8-weight", None)):
        with pytest.raises(ExportError, match="--head-refine re-scores an 8-bit LM head"):
            quantize.check_options(precision, "gguf", head_bits, 64)
    with pytest.raises(ExportError, match="--no-quantize-heads keeps the heads float32"):
        quantize.check_options("int4", "gguf", 8, 64, quantize_heads=False)
    quantize.check_options("int4", "gguf", None, 64)
    quantize.check_options("int4", "gguf", 8, 64, quantize_heads=True)
    quantize.check_options("fp32", "gguf", 8, 64)


def test_refine_on_the_command_line_exports_and_refuses_in_one_line(tmp_path, monkeypatch):
    """stories260K int4 with 8-bit heads re-scored: the manifest records it, both LM heads carry it (the full step
    too), the quality check passes, and the chain picks the 8-bit head's token; misuse exits 2 in one line."""
    import json

    import adainfer.runtime as rt
    from conftest import run_cli

    code, _, err = run_cli("adainfer-export", "-o", str(tmp_path / "bad"), "--precision", "fp16", "--head-refine", "8")
    assert code == 2 and err.strip().count("\n") == 0 and "--head-refine re-scores an 8-bit LM head" in err
    assert not (tmp_path / "bad").exists()
    bundles = {}
    for name, extra in (("head8", []), ("refined", ["--head-refine", "16"])):
        code, _, err = run_cli("adainfer-export", "-o", str(tmp_path / name), "--precision", "int4", "--head-bits", "8",
                               "--no-calib", "--quiet", *extra)
        assert code == 0, err
        bundles[name] = rt.load(tmp_path / name)
    info = json.loads((tmp_path / "refined" / "manifest.json").read_text())["extras"]["quantization"]
    assert info["head_refine"] == 16 and info["quality"]["top1_agreement"] >= info["quality"]["min_top1_agreement"]
    for graph in ("exit_head", "final_head", "full_step"):
        ops = [n.op_type for n in onnx.load(str(tmp_path / "refined" / f"{graph}.onnx"), load_external_data=False).graph.node]
        assert ops.count("TopK") >= 1 and ops.count("ScatterElements") == 1, graph
    prompts = [[1, 5, 9, 30, 7], [1, 200, 3, 44, 12, 9]]
    want, got = bundles["head8"].last_logits(prompts), bundles["refined"].last_logits(prompts)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got.max(-1) - want.max(-1)).max() < 0.05  # the best logit re-scored at 8 bits, float activations
    # each of the three has a twin whose tail is one adainfer.HeadRefine node (runtime/kernels/head_refine.c), run
    # where the library builds (CI's machine), giving the standard graphs' logits
    from adainfer.manifest import Manifest
    from adainfer.runtime.q4_1_kernel import library, twin_key

    manifest = Manifest.load(tmp_path / "refined")
    for graph in ("exit_head", "final_head", "full_step"):
        twin = onnx.load(str(tmp_path / "refined" / manifest.attachments[twin_key(graph)].file), load_external_data=False)
        ops = [n.op_type for n in twin.graph.node]
        standard_ops = [n.op_type for n in onnx.load(str(tmp_path / "refined" / f"{graph}.onnx"),
                                                       load_external_data=False).graph.node]
        assert ops.count("HeadRefine") == 1 and "ScatterElements" not in ops, graph
        assert ops.count("TopK") == standard_ops.count("TopK") - 1, graph  # (the exit head's features keep theirs)
    assert library() is not None
    refined = bundles["refined"]
    batches = (prompts, [prompts[0]])  # a padded batch runs the final head, one prompt the full step
    fused = [refined.last_logits(batch) for batch in batches]
    assert {"final_head", "full_step"} <= refined.sessions.fused
    monkeypatch.setenv("ADAINFER_Q4_1_KERNEL", "0")
    standard = rt.load(tmp_path / "refined")
    for batch, got in zip(batches, fused):
        want = standard.last_logits(batch)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert not standard.sessions.fused


@pytest.mark.parametrize("head", ["8-bit", "refined", "4-bit"])
def test_label_head_is_cut_from_a_quantized_head(tmp_path, head):
    """Calibrating a classification task on an int4 or 8-bit-head bundle needs the LM head cut down to the label
    words: from an 8-bit head or a refined one, their 8-bit rows (x @ rows, float: 1e-4); from a 4-bit head, its
    4-bit rows; the graph keeps no vocabulary-sized weight."""
    from adainfer.calib.head_graphs import label_head

    rng = np.random.default_rng(5)
    model, weights = _eight_bit_head(rng, shape=("rows",))
    if head == "refined":
        refine_heads(model, 64)
    elif head == "4-bit":
        b, s = (numpy_helper.to_array(t) for t in model.graph.initializer)
        packed, steps = round_to_4_bits(b.reshape(VOCAB, K), s.reshape(VOCAB, K // BLOCK), BLOCK)
        del model.graph.initializer[:]
        model.graph.initializer.extend([numpy_helper.from_array(packed, "B"), numpy_helper.from_array(steps, "S")])
        for a in model.graph.node[0].attribute:
            if a.name == "bits":
                a.i = 4
        codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(VOCAB, K // BLOCK, BLOCK).astype(np.float32)
        weights = ((codes - 8) * steps.reshape(VOCAB, K // BLOCK, 1)).reshape(VOCAB, K)
    onnx.save(model, str(tmp_path / "head.onnx"))
    ids = [3, 700, 1999]
    label_head(tmp_path / "head.onnx", tmp_path / "label.onnx", VOCAB, ids)
    cut = onnx.load(str(tmp_path / "label.onnx"))
    assert max(int(np.prod(t.dims)) for t in cut.graph.initializer) == K * len(ids)
    session = ort.InferenceSession(str(tmp_path / "label.onnx"), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(6, K)).astype(np.float32)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))
    want = x @ weights[ids].T
    assert np.abs(got["label_logits"] - want).max() < 1e-4
    assert np.array_equal(got["top1_id"], np.asarray(ids)[want.argmax(-1)])


def test_classification_calibration_runs_on_an_int4_bundle_with_8_bit_heads(tmp_path):
    """Before, `adainfer calib --task sst2` on a bundle with quantized LM heads stopped with "exit head: no MatMul
    with a vocabulary-sized weight"; now it calibrates and writes its policy. A hard-linked copy of the bundle
    (whose external data onnx refuses to read) is refused in one line instead of a traceback."""
    import json
    import os
    import shutil

    from conftest import ROOT, run_cli

    sst2 = next(d / "sst2_dev.tsv" for d in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data")
                if (d / "sst2_dev.tsv").exists())

    bundle = tmp_path / "int4"
    code, _, err = run_cli("adainfer-export", "-o", str(bundle), "--precision", "int4", "--head-bits", "8",
                           "--head-refine", "16", "--no-calib", "--quiet")
    assert code == 0, err
    linked = tmp_path / "linked"  # onnx refuses external data with several hard links: one line, nothing changed
    shutil.copytree(bundle, linked, copy_function=os.link)
    before = {f.name: f.stat().st_mtime_ns for f in linked.iterdir()}
    code, _, err = run_cli("adainfer", "calib", str(linked), "--data", str(sst2), "--task", "sst2", "--limit", "400")
    assert code == 2 and err.strip().count("\n") == 0 and "(copy the bundle without hard links)" in err, err
    assert {f.name: f.stat().st_mtime_ns for f in linked.iterdir()} == before
    shutil.rmtree(linked)  # the original's files are single links again
    code, out, err = run_cli("adainfer", "calib", str(bundle), "--data", str(sst2),
                             "--task", "sst2", "--limit", "400", "--target-agreement", "0.9")
    assert code == 0, err
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["extras"]["quantization"]["head_refine"] == 16
    assert "exit_policy" in manifest["attachments"] and "chosen:" in out
