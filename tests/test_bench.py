"""`adainfer bench` works end to end on stories260K (structure and positive numbers, not speed),
and the monolithic export reproduces transformers."""

import json
import sys
from pathlib import Path

import numpy as np

from conftest import STORIES_DIR, run_cli


def _positive(stats):
    assert stats["n"] >= 1
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def _python_without_peers(tmp_path) -> Path:
    """An interpreter (a script standing in for `python`) on which onnxruntime_genai and llama_cpp cannot be
    imported, whatever this environment has: the bench must report those peers, not drop them."""
    script = tmp_path / "python-without-peers"
    script.write_text(f"""#!{sys.executable}
import runpy, sys
sys.modules["onnxruntime_genai"] = None  # import raises ImportError
sys.modules["llama_cpp"] = None
assert sys.argv[1] == "-m"
module = sys.argv[2]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
""")
    script.chmod(0o755)
    return script


def test_bench_stories260k_json(tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_cli("adainfer", "bench", "--json", str(out), "--repeats", "1", "--warmup", "0",
                                   "--decode-tokens", "4", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
                                   "--precisions", "fp32,int8-weight", "--peer-python", str(_python_without_peers(tmp_path)),
                                   "--no-transformers", "--no-classifier", timeout=600)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    L = result["num_layers"]
    assert L == 5
    rows = result["contenders"]
    timed = {"monolithic", "chain_full", "chain_exit@1", "chain_exit@2", "chain_exit@4", "chain_int8-weight"}
    assert {n for n, row in rows.items() if row["status"] == "ok"} == timed
    for name in ("genai_fp32", "genai_int4"):  # a peer that cannot be imported is a row saying so
        assert rows[name]["status"] == "not installable" and "onnxruntime_genai" in rows[name]["reason"], rows[name]
    assert rows["llamacpp"]["status"] == "skipped" and "GGUF" in rows["llamacpp"]["reason"]
    for name in timed:
        row = rows[name]
        assert row["macs_per_token"] > 0
        for metric in ("prefill_16", "prefill_128", "decode"):
            _positive(row["timings"][metric])
    for name in ("monolithic", "chain_full", "chain_int8-weight"):  # own worker: own peak RSS and size on disk
        mem = rows[name]["memory"]
        assert mem["peak_mb"] >= mem["loaded_mb"] > mem["baseline_mb"] > 0
        assert rows[name]["size_bytes"] > 0
    bundle = tmp_path / "cache" / "bench-stories260K"
    assert rows["monolithic"]["size_bytes"] == sum((bundle / f).stat().st_size for f in ("model.onnx",))
    assert "memory" not in rows["chain_exit@2"] and rows["chain_exit@2"]["size_bytes"] is None
    r = result["ratios"]
    assert r["chain_full_over_monolithic_decode"]["median"] > 0
    assert set(r["chain_full_over_monolithic_prefill"]) == {"16", "128"}
    assert set(r["forced_exit_over_full_decode"]) == {"1", "2", "4"}
    assert r["forced_exit_target"] == {str(k): k / 5 + 0.05 for k in (1, 2, 4)}
    assert set(r["decode_over"]) == {"monolithic", "chain_full"}
    assert set(r["decode_over"]["chain_full"]) == timed
    got = r["decode_over"]["monolithic"]["chain_int8-weight"]["median"]
    samples = result["samples_seconds"]
    assert got == samples["chain_int8-weight"]["decode"][0] / samples["monolithic"]["decode"][0]
    assert result["settings"]["prompt"].endswith("tinystories_heldout.txt (model tokenizer)")
    for key in ("platform", "cpu", "cores", "onnxruntime", "load_average_at_end"):
        assert result["machine"][key]
    md = out.with_suffix(".md").read_text()
    assert "| `chain_full` |" in md and "| `genai_int4` | not installable: " in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `monolithic` |" in stdout


def test_bench_runs_the_global_pool_chain_in_a_process_of_its_own(tmp_path):
    out = tmp_path / "bench.json"
    code, _, stderr = run_cli("adainfer", "bench", "--json", str(out), "--repeats", "1", "--warmup", "0",
                              "--decode-tokens", "4", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
                              "--contenders", "chain_full,chain_global,chain_global_exit@2", "--no-peers", timeout=600)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    rows = result["contenders"]
    assert {n: rows[n]["thread_pool"] for n in rows} == {
        "chain_full": "per-session", "chain_global": "global", "chain_global_exit@2": "global"}
    assert rows["chain_global"]["memory"]["peak_mb"] > 0 and rows["chain_global_exit@2"]["layers"] == 2
    assert set(result["ratios"]["forced_exit_over_own_full_decode"]["chain_global"]) == {"2"}


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
