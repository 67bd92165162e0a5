"""`adainfer bench` works end to end on stories260K (structure and positive numbers, not speed),
and the monolithic export reproduces transformers."""

import json

import numpy as np

from conftest import STORIES_DIR, run_cli


def _positive(stats):
    assert stats["n"] >= 1
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def test_bench_stories260k_json(tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_cli("adainfer", "bench", "--json", str(out), "--repeats", "1", "--warmup", "0",
                                   "--decode-tokens", "4", "--cache-dir", str(tmp_path / "cache"), "--no-memory",
                                   "--no-transformers", "--no-classifier", timeout=240)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    L = result["num_layers"]
    assert L == 5
    rows = result["contenders"]
    assert {"monolithic", "chain_full"} <= set(rows)
    assert [n for n in rows if n.startswith("chain_exit@")] == ["chain_exit@1", "chain_exit@2", "chain_exit@4"]
    for name, row in rows.items():
        assert row["macs_per_token"] > 0
        for metric in ("prefill_16", "prefill_128", "decode"):
            _positive(row["timings"][metric])
    r = result["ratios"]
    for key in ("chain_full_over_monolithic_decode",):
        assert r[key]["median"] > 0
    assert set(r["chain_full_over_monolithic_prefill"]) == {"16", "128"}
    assert set(r["forced_exit_over_full_decode"]) == {"1", "2", "4"}
    for key in ("platform", "cpu", "cores", "onnxruntime"):
        assert result["machine"][key]
    assert "| `chain_full` |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `monolithic` |" in stdout


def test_bench_refuses_unknown_shape(tmp_path):
    code, _, stderr = run_cli("adainfer", "bench", "--shape", "huge", "--json", str(tmp_path / "x.json"))
    assert code == 2
    assert "unknown shape 'huge'" in stderr and len(stderr.strip().splitlines()) == 1


def test_bench_refuses_missing_model_dir(tmp_path):
    code, _, stderr = run_cli("adainfer", "bench", str(tmp_path / "nope"), "--json", str(tmp_path / "x.json"))
    assert code == 2
    assert "model directory not found" in stderr


def test_monolithic_graph_matches_transformers(tmp_path, stories_hf):
    import onnxruntime as ort

    from adainfer.exporter import export
    from adainfer.exporter.monolithic import kv_input_names
    from adainfer.manifest import Manifest

    out = tmp_path / "b"
    export(STORIES_DIR, out, progress=False, monolithic=True)  # verified at export; checked again here
    manifest = Manifest.load(out)
    assert manifest.attachments["monolithic"].file == "model.onnx"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "position_ids", "attention_mask"]
    assert names[3:] == kv_input_names(manifest.num_layers)
    ids = [1, 403, 407, 261, 378]
    empty = np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), dtype=np.float32)
    got = session.run(None, {"input_ids": np.asarray([ids]), "position_ids": np.arange(5)[None],
                             "attention_mask": np.ones((1, 5), dtype=np.int64),
                             **{n: empty for n in kv_input_names(manifest.num_layers)}})
    import torch

    with torch.no_grad():
        want = stories_hf(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(got[0][0], want, atol=1e-4)
    assert got[1].shape == (1, manifest.num_kv_heads, 5, manifest.head_dim)


def test_export_cli_has_monolithic_option():
    code, stdout, _ = run_cli("adainfer-export", "--help")
    assert code == 0 and "--monolithic" in stdout
