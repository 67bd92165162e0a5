"""TensorRT engines and GPU backends: the pure-Python parts on CPU, the rest on a GPU (marked `gpu`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from adainfer.engines.errors import EngineError, EngineMismatchError, GpuUnavailableError
from adainfer.engines.metadata import (DeviceInfo, check_record, engines_dirname, engines_path, find_engines,
                                       make_record, manifest_sha256)
from adainfer.engines.precision import Node, fp32_nodes, layer_nodes, metadata_nodes, nodes_from_onnx
from adainfer.engines.profiles import BuildOptions, graph_profiles, union_profile
from adainfer.errors import AdainferError
from adainfer.manifest import Manifest

from conftest import run_cli

ORIN = DeviceInfo("Orin", "8.7", "10.3.0")


def gpu_available() -> bool:
    try:
        import tensorrt  # noqa: F401
        from adainfer.runtime.cuda_rt import device_count

        return device_count() > 0
    except Exception:
        return False


gpu = pytest.mark.skipif(not gpu_available(), reason="needs tensorrt, cuda-python and a CUDA device")


@pytest.fixture(scope="module")
def manifest(stories_bundle) -> Manifest:
    return Manifest.load(stories_bundle)


# ---------------------------------------------------------------- profiles


def test_block_profiles_prefill_and_decode(manifest):
    options = BuildOptions(max_batch=4, max_seq=32, max_context=100).resolved(manifest)
    prefill, decode = graph_profiles("block_00", manifest.graphs["block_00"], options)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    kv, hd, h = manifest.num_kv_heads, manifest.head_dim, manifest.hidden_size
    assert prefill.shapes["hidden_states"] == ((1, 1, h), (1, 32, h), (4, 32, h))
    assert prefill.shapes["past_key"] == ((1, kv, 0, hd), (1, kv, 0, hd), (4, kv, 0, hd))
    assert prefill.shapes["attention_mask"] == ((1, 1), (1, 32), (4, 32))
    assert decode.shapes["hidden_states"] == ((1, 1, h), (1, 1, h), (4, 1, h))
    assert decode.shapes["position_ids"] == ((1, 1), (1, 1), (4, 1))
    assert decode.shapes["past_value"] == ((1, kv, 1, hd), (1, kv, 99, hd), (4, kv, 99, hd))
    assert decode.shapes["attention_mask"] == ((1, 2), (1, 100), (4, 100))


def test_embed_and_head_profiles(manifest):
    options = BuildOptions(max_batch=2, max_seq=16, max_context=64, opt_context=40).resolved(manifest)
    embed = graph_profiles("embed", manifest.graphs["embed"], options)
    assert [p.shapes["input_ids"] for p in embed] == [((1, 1), (1, 16), (2, 16)), ((1, 1), (1, 1), (2, 1))]
    (rows,) = graph_profiles("exit_head", manifest.graphs["exit_head"], options)
    assert rows.name == "rows" and rows.shapes["hidden_states"] == ((1, 64), (1, 64), (32, 64))
    block = graph_profiles("block_01", manifest.graphs["block_01"], options)
    assert block[1].shapes["past_key"][1][2] == 39
    union = union_profile(block)
    assert union.shapes["past_key"][0][2] == 0 and union.shapes["past_key"][2][2] == 63


def test_default_options_follow_the_manifest(manifest):
    options = BuildOptions().resolved(manifest)
    assert (options.max_batch, options.max_context, options.max_seq) == (1, manifest.max_positions, 256)


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_context=10_000), "exceeds the model's"),
    (dict(max_seq=64, max_context=32), "exceeds max_context"),
    (dict(max_batch=0), "max_batch"),
    (dict(precision="int4"), "precision"),
    (dict(max_context=1), "at least 2"),
])
def test_bad_options_are_refused(manifest, kwargs, words):
    with pytest.raises(EngineError, match=words):
        BuildOptions(**kwargs).resolved(manifest)


# ---------------------------------------------------------------- precision


def test_fp32_nodes_of_a_real_block_are_its_norms_and_softmax(stories_bundle, manifest):
    nodes = nodes_from_onnx(stories_bundle / manifest.graphs["block_00"].file)
    chosen = fp32_nodes(nodes)
    ops = {n.name: n.op_type for n in nodes}
    norm_pieces = {"Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"}
    for norm in ("/input_layernorm/", "/post_attention_layernorm/"):
        picked = {ops[n] for n in chosen if n.startswith(norm)}
        assert picked == norm_pieces, norm
        assert f"{norm}Mul_1" not in chosen  # the weight scale is outside the float32 island
    softmax = [n.name for n in nodes if n.op_type == "Softmax"]
    assert softmax and set(softmax) <= set(chosen)
    assert not any(ops[n] in ("MatMul", "Gather", "Concat") for n in chosen)
    assert len(chosen) == 13  # 2 norms x 6 pieces + softmax


def test_fp32_nodes_of_the_heads(stories_bundle, manifest):
    head = nodes_from_onnx(stories_bundle / manifest.graphs["exit_head"].file)
    chosen = fp32_nodes(head)
    ops = {n.name: n.op_type for n in head}
    assert {"Pow", "ReduceMean", "Sqrt", "Div", "Softmax", "TopK", "Sub"} <= {ops[n] for n in chosen}
    top1 = next(n for n in head if "top1_id" in n.outputs)
    assert top1.name not in chosen  # integer indices stay out
    final = fp32_nodes(nodes_from_onnx(stories_bundle / manifest.graphs["final_head"].file))
    assert len(final) == 6 and not fp32_nodes(nodes_from_onnx(stories_bundle / manifest.graphs["embed"].file))


def test_fp32_nodes_find_layernorm_written_as_primitives():
    nodes = [Node("mean", "ReduceMean", ("x",), ("m",)), Node("sub", "Sub", ("x", "m"), ("d",)),
             Node("sq", "Pow", ("d", "two"), ("d2",)), Node("var", "ReduceMean", ("d2",), ("v",)),
             Node("eps", "Add", ("v", "e"), ("ve",)), Node("sqrt", "Sqrt", ("ve",), ("s",)),
             Node("div", "Div", ("d", "s"), ("n",)), Node("scale", "Mul", ("n", "w"), ("y",)),
             Node("ln", "LayerNormalization", ("y", "g", "b"), ("z",)), Node("mm", "MatMul", ("z", "W"), ("o",))]
    assert fp32_nodes(nodes) == ["mean", "sub", "sq", "var", "eps", "sqrt", "div", "ln"]


def test_layers_map_back_to_onnx_nodes():
    names = ["/input_layernorm/Pow", "/Mul", "/Mul_1"]
    assert metadata_nodes("[ONNX Layer: /a/Pow]\x1f[ONNX Layer: /a/Sqrt | doc]") == ["/a/Pow", "/a/Sqrt"]
    assert layer_nodes("fused", "[ONNX Layer: /Mul]", names) == {"/Mul"}
    assert layer_nodes("/input_layernorm/Pow", "", names) == {"/input_layernorm/Pow"}
    assert layer_nodes("/input_layernorm/Pow_57", "", names) == {"/input_layernorm/Pow"}  # parser's extra layer
    assert layer_nodes("/Mul_1", "", names) == {"/Mul_1"}  # a node of its own, not an extra layer of /Mul
    assert layer_nodes("ONNXTRT_Broadcast_3", "", names) == set()


# ---------------------------------------------------------------- engine records


def test_engine_dir_name_and_record_check(stories_bundle):
    assert engines_dirname(DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.7.0")) == "NVIDIA_H100_80GB_HBM3_trt10.7.0"
    sha = manifest_sha256(stories_bundle)
    record = make_record(ORIN, BuildOptions().to_dict(), sha, {})
    check_record(record, ORIN, sha)  # same device: accepted
    with pytest.raises(EngineMismatchError) as err:
        check_record(record, DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.3.0"), sha, "b")
    message = str(err.value)
    assert "\n" not in message and "Orin (sm 8.7)" in message and "rebuild on this device" in message
    with pytest.raises(EngineMismatchError, match="TensorRT 10.3.0, this device is Orin .* TensorRT 10.7.0"):
        check_record(record, DeviceInfo("Orin", "8.7", "10.7.0"), sha)
    with pytest.raises(EngineMismatchError, match="different manifest.json"):
        check_record(record, ORIN, "0" * 64)
    assert issubclass(EngineMismatchError, AdainferError)


def test_find_engines_refuses_engines_built_elsewhere(tmp_path, stories_bundle):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(stories_bundle, bundle)
    with pytest.raises(EngineMismatchError, match="no TensorRT engines for this device"):
        find_engines(bundle, ORIN)
    other = DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", "10.3.0")
    directory = engines_path(bundle, other)
    directory.mkdir(parents=True)
    (directory / "engine.json").write_text(json.dumps(make_record(other, {}, manifest_sha256(bundle), {})))
    with pytest.raises(EngineMismatchError, match="built for NVIDIA GeForce RTX 4090 .* rebuild on this device"):
        find_engines(bundle, ORIN)
    assert find_engines(bundle, other)[0] == directory


# ---------------------------------------------------------------- recipes


def test_recipes_only_without_a_gpu(tmp_path, stories_bundle, manifest):
    out = tmp_path / "r"
    code, stdout, stderr = run_cli("adainfer", "build-engines", str(stories_bundle), "--recipes-only", "--precision",
                                   "fp16", "--max-batch", "2", "--max-seq", "32", "--max-context", "128", "--out", str(out))
    assert code == 0, stderr
    script = (out / "trtexec.sh").read_text()
    commands = script.split("\n\n")[1:]
    commands = [c for c in commands if c.startswith("trtexec")]
    assert len(commands) == len(manifest.graphs)
    block = next(c for c in commands if "block_00.onnx" in c)
    assert block.count("--minShapes=") == 2 and block.count("--maxShapes=") == 2
    assert "past_key:1x4x0x8" in block and "past_key:2x4x127x8" in block and "attention_mask:2x128" in block
    for flag in ("--fp16", "--precisionConstraints=obey", "--timingCacheFile=timing.cache", "--saveEngine=block_00.plan"):
        assert flag in block
    assert "/input_layernorm/Pow:fp32" in block and "/Softmax:fp32" in block and "MatMul:fp32" not in block
    head = next(c for c in commands if "exit_head.onnx" in c)
    assert head.count("--minShapes=") == 1 and "hidden_states:64x64" in head
    code, _, stderr = run_cli("adainfer", "build-engines", str(stories_bundle), "--recipes-only", "--precision", "fp32",
                              "--out", str(out))
    assert code == 0 and "--fp16" not in (out / "trtexec.sh").read_text()


# ---------------------------------------------------------------- backends without a GPU

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "tensorrt", "cuda"):
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
"""


def test_gpu_backends_import_without_gpu_packages(stories_bundle):
    code = BLOCKER + """
import adainfer.runtime as rt, adainfer.runtime.trt_backend, adainfer.runtime.ort_gpu, adainfer.engines.build
from adainfer.engines.errors import GpuUnavailableError
try:
    rt.load(sys.argv[1], backend="tensorrt")
except GpuUnavailableError as exc:
    print("refused:", exc)
heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "tensorrt", "cuda")]
print("heavy:", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code, str(stories_bundle)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "refused: the tensorrt backend needs the tensorrt Python package" in out.stdout
    assert "heavy: []" in out.stdout


@pytest.mark.skipif(gpu_available(), reason="checks the no-GPU refusal")
def test_cli_refuses_tensorrt_without_gpu_in_one_line(stories_bundle):
    for args in (("run", str(stories_bundle), "Once upon a time", "--backend", "tensorrt"),
                 ("build-engines", str(stories_bundle))):
        code, stdout, stderr = run_cli("adainfer", *args)
        assert code == 2 and stdout == ""
        assert stderr.startswith("adainfer: error: ") and stderr.count("\n") == 1, stderr


def test_unknown_backend_is_refused(stories_bundle):
    import adainfer.runtime as rt
    from adainfer.errors import InputError

    with pytest.raises(InputError, match="unknown backend"):
        rt.load(stories_bundle, backend="cuda-magic")
    assert issubclass(GpuUnavailableError, AdainferError)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@gpu
def test_fp32_engines_match_the_cpu_runtime(tmp_path, stories_bundle):
    import shutil

    import adainfer.runtime as rt
    from adainfer.engines.build import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(stories_bundle, bundle)
    build_engines(bundle, BuildOptions(precision="fp32", max_batch=2, max_seq=64, max_context=128), log=lambda _: None)
    cpu, gpu_model = rt.load(bundle), rt.load(bundle, backend="tensorrt")
    prompts = [[1, 403, 407, 261, 378], [1, 9, 30]]
    assert np.abs(cpu.last_logits(prompts) - gpu_model.last_logits(prompts)).max() < 1e-3
    assert cpu.generate("Once upon a time", max_new_tokens=24).tokens == gpu_model.generate("Once upon a time", max_new_tokens=24).tokens
    assert gpu_model.generate("Once upon a time", max_new_tokens=24).tokens == cpu.generate("Once upon a time", max_new_tokens=24).tokens  # graph replays
