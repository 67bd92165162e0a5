"""TensorRT engines and GPU backends: the pure-Python parts on CPU, the rest on a GPU (marked `gpu`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from adainfer.engines.errors import EngineError, EngineMismatchError, GpuUnavailableError
from adainfer.engines.metadata import (DECIDER, DeviceInfo, check_decider, check_record, engines_dirname, engines_path,
                                       find_engines, make_record)
from adainfer.engines.profiles import BuildOptions, graph_profiles, union_profile
from adainfer.errors import AdainferError
from adainfer.manifest import Manifest, manifest_digest

from conftest import ROOT, STORIES_DIR, run_cli

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
def stories_bundle(tmp_path_factory):
    """TensorRT's parser reads standard ONNX operators only, so engines are built from a bundle with
    traced blocks (`adainfer-export --generic-blocks`), not ONNX Runtime's fused ones."""
    from adainfer.exporter import export

    out = tmp_path_factory.mktemp("bundles") / "stories260K-generic"
    export(STORIES_DIR, out, progress=False, fused=False)
    return out


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


# ---------------------------------------------------------------- precision (strongly typed: the bundle's own)


def test_engine_precision_is_the_bundles_and_a_mismatch_is_refused(stories_bundle, manifest):
    import dataclasses

    from adainfer.engines.precision import engine_precision

    assert engine_precision(stories_bundle, manifest) == "fp32" == engine_precision(stories_bundle, manifest, "fp32")
    for asked in ("fp16", "int8"):
        with pytest.raises(EngineError) as err:
            engine_precision(stories_bundle, manifest, asked)
        assert "\n" not in str(err.value) and "strongly typed" in str(err.value)
    blocks = {g: dataclasses.replace(spec, precision="int4") if g.startswith("block_") else spec
              for g, spec in manifest.graphs.items()}
    with pytest.raises(EngineError, match="int4 .* TensorRT cannot parse"):
        engine_precision(stories_bundle, dataclasses.replace(manifest, graphs=blocks))


def test_builds_use_strongly_typed_networks_and_no_precision_flags():
    """What TensorRT 11 removed is not used (the API-surface check covers the names themselves)."""
    import inspect

    import adainfer.engines.build as build

    source = inspect.getsource(build.TrtBuilder) + inspect.getsource(build.strongly_typed_network)
    assert "STRONGLY_TYPED" in source
    for gone in ("BuilderFlag", "int8_calibrator", "set_calibration_profile", "set_output_type", "IInt8", ".precision ="):
        assert gone not in source, gone

    class Flags:
        STRONGLY_TYPED = 3

    class Builder:
        def create_network(self, flags):
            self.flags = flags
            return "network"

    trt, builder = type("trt", (), {"NetworkDefinitionCreationFlag": Flags}), Builder()
    assert build.strongly_typed_network(trt, builder) == "network" and builder.flags == 1 << 3


# ---------------------------------------------------------------- engine records


def test_engine_dir_name_and_record_check(stories_bundle):
    assert engines_dirname(DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.7.0")) == "NVIDIA_H100_80GB_HBM3_trt10.7.0"
    record = make_record(ORIN, BuildOptions().to_dict(), manifest_digest(stories_bundle), {})
    check_record(record, ORIN, stories_bundle)  # same device: accepted
    with pytest.raises(EngineMismatchError) as err:
        check_record(record, DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.3.0"), stories_bundle)
    message = str(err.value)
    assert "\n" not in message and "Orin (sm 8.7)" in message and "rebuild on this device" in message
    with pytest.raises(EngineMismatchError, match="TensorRT 10.3.0, this device is Orin .* TensorRT 10.7.0"):
        check_record(record, DeviceInfo("Orin", "8.7", "10.7.0"), stories_bundle)
    with pytest.raises(EngineMismatchError, match="another export of this bundle .* rebuild on this device") as err:
        check_record(dict(record, manifest_digest="0" * 64), ORIN, stories_bundle)
    assert "\n" not in str(err.value)
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
    (directory / "engine.json").write_text(json.dumps(make_record(other, {}, manifest_digest(bundle), {})))
    with pytest.raises(EngineMismatchError, match="built for NVIDIA GeForce RTX 4090 .* rebuild on this device"):
        find_engines(bundle, ORIN)
    assert find_engines(bundle, other)[0] == directory
    old = dict(make_record(other, {}, "x", {}), manifest_sha256="0" * 64)
    del old["manifest_digest"]
    (directory / "engine.json").write_text(json.dumps(old))  # a record of the first engine format
    with pytest.raises(EngineError, match="lacks manifest_digest .* rebuild"):
        find_engines(bundle, other)


# ---------------------------------------------------------------- staged builds and records (fake engines, CPU)


class FakeBuilder:
    """Stands in for TensorRT in tests of the staging and the record: its 'engines' are labels
    (nothing here runs them), and it can fail at a chosen graph."""

    def __init__(self, fail_at=None):
        self.fail_at, self.built = fail_at, []

    def build(self, graph, onnx_path, profiles, staging):
        from adainfer.engines.build import BuiltEngine

        assert onnx_path.is_file() and profiles
        if graph == self.fail_at:
            raise EngineError(f"{graph}: injected failure")
        self.built.append(graph)
        return BuiltEngine(f"not an engine: {graph}".encode())

    def timing_cache(self):
        return b"cache"


def fake_build(bundle, builder=None, device=ORIN, options=None):
    from adainfer.engines.build import write_engines

    manifest = Manifest.load(bundle)
    options = (options or BuildOptions(max_batch=2, max_seq=16, max_context=64)).resolved(manifest)
    return write_engines(bundle, manifest, options, device, engines_path(bundle, device), builder or FakeBuilder(),
                         log=lambda _: None)


@pytest.fixture(scope="module")
def calibrated_bundles(stories_bundle, tmp_path_factory):
    """stories260K calibrated with a folded linear classifier: on the full exit head and hidden-only."""
    import shutil

    from adainfer.calib.calibrate import calibrate
    from adainfer.paths import DEFAULT_CALIB_DATA

    out = {}
    for variant in ("full-head", "hidden-only"):
        bundle = tmp_path_factory.mktemp("engines-calib") / variant
        shutil.copytree(stories_bundle, bundle)
        calibrate(bundle, DEFAULT_CALIB_DATA, limit=30, progress=False, kinds=("logreg",), variant=variant)
        out[variant] = bundle
    return out


def leftovers(bundle):
    return sorted(p.name for p in (bundle / "engines").iterdir() if p.name.startswith("."))


def test_engine_build_is_staged_and_a_failure_keeps_the_old_engines(tmp_path, stories_bundle):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(stories_bundle, bundle)
    with pytest.raises(EngineError, match="injected"):
        fake_build(bundle, FakeBuilder(fail_at="block_00"))
    assert not engines_path(bundle, ORIN).exists() and leftovers(bundle) == []  # none, not a partial one
    directory = fake_build(bundle)
    record = json.loads((directory / "engine.json").read_text())
    assert record["manifest_digest"] == manifest_digest(bundle) and set(record["graphs"]) == (
        set(Manifest.load(bundle).graphs) - Manifest.load(bundle).merged_graphs)  # TensorRT runs single blocks
    assert DECIDER not in record["graphs"]  # not calibrated
    assert {"trtexec.sh", "timing.cache", "block_00.plan"} <= {p.name for p in directory.iterdir()}
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(EngineError, match="injected"):
        fake_build(bundle, FakeBuilder(fail_at="final_head"), options=BuildOptions(max_batch=4))
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before and leftovers(bundle) == []
    find_engines(bundle, ORIN)


def test_killed_engine_build_leaves_the_old_engines(tmp_path, stories_bundle):
    import os
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(stories_bundle, bundle)
    directory = fake_build(bundle)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    script = f"""
import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})
from pathlib import Path
from test_engines import fake_build, FakeBuilder
from adainfer.engines.profiles import BuildOptions
fake_build(Path(sys.argv[1]), options=BuildOptions(max_batch=3))
"""
    for point in ("engine_block_02", "rename"):
        env = dict(os.environ, ADAINFER_TEST_KILL_AT=point)
        out = subprocess.run([sys.executable, "-c", script, str(bundle)], env=env, capture_output=True, text=True)
        assert out.returncode == -9, out.stderr
        assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert leftovers(bundle)  # the killed build's staging directory ...
    fake_build(bundle)
    assert leftovers(bundle) == []  # ... is removed by the next build


def test_calibration_keeps_engines_valid_and_a_reexport_does_not(tmp_path, stories_bundle):
    import dataclasses
    import shutil

    from adainfer.calib.calibrate import calibrate
    from adainfer.engines.decider import bundle_folded_policy, extra_features
    from adainfer.paths import DEFAULT_CALIB_DATA

    bundle = tmp_path / "b"
    shutil.copytree(stories_bundle, bundle)
    fake_build(bundle)
    calibrate(bundle, DEFAULT_CALIB_DATA, limit=30, progress=False, kinds=("logreg",), variant="full-head")
    directory, record = find_engines(bundle, ORIN)  # manifest.json changed (attachments), its digest did not
    policy, _, sha = bundle_folded_policy(bundle, Manifest.load(bundle))
    with pytest.raises(EngineMismatchError, match="no exit decider .* rebuild on this device") as err:
        check_decider(record, sha, extra_features(policy), bundle)  # engines from before the calibration
    assert "\n" not in str(err.value)
    builder = FakeBuilder()
    fake_build(bundle, builder)
    assert builder.built[-1] == DECIDER
    directory, record = find_engines(bundle, ORIN)
    check_decider(record, sha, extra_features(policy), bundle)
    assert record["graphs"][DECIDER]["source"] == {"head_sha256": sha, "features": extra_features(policy)}
    assert (directory / "exit_decider.onnx").is_file() and "--saveEngine=exit_decider.plan" in (directory / "trtexec.sh").read_text()
    with pytest.raises(EngineMismatchError, match="another calibration"):
        check_decider(record, "0" * 64, extra_features(policy), bundle)
    manifest = Manifest.load(bundle)  # a re-export: what the export decided changes
    dataclasses.replace(manifest, exporter=dataclasses.replace(manifest.exporter, adainfer="9.9.9")).save(bundle)
    with pytest.raises(EngineMismatchError, match="another export of this bundle .* rebuild on this device"):
        find_engines(bundle, ORIN)


# ---------------------------------------------------------------- the exit decider (CPU: ONNX Runtime runs its graph)


def test_decider_profile_is_rows_up_to_max_batch(calibrated_bundles, tmp_path):
    from adainfer.engines.decider import bundle_folded_policy, write_decider

    bundle = calibrated_bundles["full-head"]
    manifest = Manifest.load(bundle)
    policy, folded, _ = bundle_folded_policy(bundle, manifest)
    spec = write_decider(folded, policy, manifest.hidden_size, tmp_path / "d.onnx")
    # which inputs depend on the features the calibration chose: the hidden state always (full head)
    extra = [f for f in policy.features if f not in ("gap", "top_prob")]
    wanted = ["hidden_states"] + (["previous_hidden_states"] if {"cos_prev", "norm_ratio"} & set(extra) else []) \
        + (["layer_frac"] if "layer_frac" in extra else [])
    assert [t.name for t in spec.inputs] == wanted
    assert [t.name for t in spec.outputs] == ["top1_id", "score"]
    (profile,) = graph_profiles(DECIDER, spec, BuildOptions(max_batch=3, max_seq=32, max_context=64).resolved(manifest))
    h = manifest.hidden_size
    assert profile.name == "decider"
    widths = {"hidden_states": h, "previous_hidden_states": h, "layer_frac": 1}
    assert profile.shapes == {name: ((1, widths[name]), (1, widths[name]), (3, widths[name])) for name in wanted}


def test_recipes_only_on_a_calibrated_bundle_build_the_decider(tmp_path, calibrated_bundles):
    out = tmp_path / "r"
    code, _, stderr = run_cli("adainfer", "build-engines", str(calibrated_bundles["full-head"]), "--recipes-only",
                              "--max-batch", "2", "--max-seq", "32", "--max-context", "64", "--out", str(out))
    assert code == 0, stderr
    commands = [c for c in (out / "trtexec.sh").read_text().split("\n\n") if c.startswith("trtexec")]
    decider = next(c for c in commands if "--onnx=exit_decider.onnx" in c)
    from adainfer.runtime.exit_policy import ExitPolicy

    policy = ExitPolicy.load(calibrated_bundles["full-head"] / "exit_policy.json")
    extra = [f for f in policy.features if f not in ("gap", "top_prob")]
    wanted = {"hidden_states": 64}
    if {"cos_prev", "norm_ratio"} & set(extra):
        wanted["previous_hidden_states"] = 64
    if "layer_frac" in extra:
        wanted["layer_frac"] = 1
    assert "--minShapes=" + ",".join(f"{n}:1x{w}" for n, w in wanted.items()) + " \\" in decider
    assert "--maxShapes=" + ",".join(f"{n}:2x{w}" for n, w in wanted.items()) + " \\" in decider
    assert "--stronglyTyped" in decider and "--fp16" not in decider and "--int8" not in decider
    assert (out / "exit_decider.onnx").is_file()


def trt_on_ort(bundle, max_batch: int = 1):
    """The tensorrt backend's own code on engines stood in for by ONNX Runtime (tests/fake_engines.py)."""
    import adainfer.runtime as rt
    from adainfer.runtime.backends.tensorrt import TensorRTBackend
    from adainfer.runtime.bundle import open_bundle
    from adainfer.runtime.device_memory import HostMemory
    from fake_engines import fake_engines

    b = open_bundle(bundle)
    engines = fake_engines(bundle, BuildOptions(max_batch=max_batch, max_seq=32, max_context=64))
    return rt.Model(b, TensorRTBackend(b, memory=HostMemory(), engines=engines))


@pytest.mark.parametrize("variant", ["full-head", "hidden-only"])
def test_device_decisions_equal_the_cpu_runtime(calibrated_bundles, variant):
    """The exit-decider graph run where the tensorrt backend runs it (rows and layer fractions by
    address), against ExitDecider on the cpu backend: same exit layer, decisions and token."""
    import dataclasses

    import adainfer.runtime as rt
    from adainfer.runtime.device_exit import DeviceDecider
    from adainfer.runtime.early_exit import ExitDecider, load_policy, predict

    bundle = calibrated_bundles[variant]
    model, device = rt.load(bundle), trt_on_ort(bundle)
    policy = load_policy(model)
    assert policy.decision == "folded" and device.backend.engines[DECIDER].executions == 0
    prompts = ["Once upon a time", "The little dog was very happy because", "Lily and Tom went to the park. They saw"]
    exits = set()
    for shift in (0.0, -1.0, -2.0, -4.0):  # lower thresholds exit earlier
        p = dataclasses.replace(policy, threshold=policy.threshold + shift)
        for prompt in prompts:
            ids = model.encode(prompt)
            want = predict(model, ids, ExitDecider(model, p))
            got = predict(device, ids, device.backend.make_decider(device, p))
            assert (got.exit_layer, got.decisions, got.token) == (want.exit_layer, want.decisions, want.token), (prompt, shift)
            exits.add(want.exit_layer)
    assert len(exits) > 1  # the thresholds above reach more than one exit layer
    assert device.backend.engines[DECIDER].executions > 0  # decided by the decider graph, not on the host
    low = dataclasses.replace(policy, threshold=policy.threshold - 2.0)
    want = model.generate("Once upon a time", max_new_tokens=12, mode="early-exit", policy=low)
    got = device.generate("Once upon a time", max_new_tokens=12, mode="early-exit", policy=low)
    assert got.layers_per_token == want.layers_per_token and got.tokens == want.tokens
    assert min(want.layers_per_token) < model.num_layers  # some tokens did exit early


def test_device_decider_refuses_what_tensorrt_cannot_run():
    from adainfer.engines.errors import DeviceDecisionError
    from adainfer.runtime.device_exit import DeviceDecider, device_decider
    from adainfer.runtime.exit_policy import ExitPolicy

    rbf = ExitPolicy(decision="classifier", features=["gap", "top_prob"], threshold=0.0, name="svm-rbf/paper",
                     classifier_file="classifier.onnx")
    with pytest.raises(DeviceDecisionError) as err:
        device_decider(rbf, 5, "tensorrt")
    message = str(err.value)
    assert "\n" not in message and "TensorRT cannot run" in message and "linear classifier" in message
    with pytest.raises(DeviceDecisionError, match="cos_prev"):
        DeviceDecider(ExitPolicy.rule(0.9, "cos_prev"), 5)
    # rules read the exit head's outputs; forced exits need no graph and copy nothing back
    rule = DeviceDecider(ExitPolicy.rule(0.8), 5)
    assert (rule.graph, rule.outputs) == ("exit_head", ["gap", "top1_id"])
    stop = rule.decide_outputs(3, {"gap": np.array([0.8], np.float32), "top1_id": np.array([43])})
    go_on = rule.decide_outputs(2, {"gap": np.array([0.7], np.float32), "top1_id": np.array([42])})
    assert (stop.stop, int(stop.token[0]), go_on.stop) == (True, 43, False)
    forced = DeviceDecider(ExitPolicy.forced(2), 5)
    assert forced.graph is None and forced.evaluates(2) and not forced.evaluates(3) and forced.decide_outputs(2, {}).stop


# ---------------------------------------------------------------- recipes


def test_recipes_only_without_a_gpu(tmp_path, stories_bundle, manifest):
    out = tmp_path / "r"
    code, stdout, stderr = run_cli("adainfer", "build-engines", str(stories_bundle), "--recipes-only",
                                   "--max-batch", "2", "--max-seq", "32", "--max-context", "128", "--out", str(out))
    assert code == 0, stderr
    script = (out / "trtexec.sh").read_text()
    commands = script.split("\n\n")[1:]
    commands = [c for c in commands if c.startswith("trtexec")]
    assert len(commands) == len(manifest.graphs) - len(manifest.merged_graphs)  # no engines for spans or the full step
    block = next(c for c in commands if "block_00.onnx" in c)
    assert block.count("--minShapes=") == 2 and block.count("--maxShapes=") == 2
    assert "past_key:1x4x0x8" in block and "past_key:2x4x127x8" in block and "attention_mask:2x128" in block
    for flag in ("--stronglyTyped", "--timingCacheFile=timing.cache", "--saveEngine=block_00.plan"):
        assert flag in block
    assert "--fp16" not in block and "--int8" not in block and "--precisionConstraints" not in block
    head = next(c for c in commands if "exit_head.onnx" in c)
    assert head.count("--minShapes=") == 1 and "hidden_states:64x64" in head
    code, _, stderr = run_cli("adainfer", "build-engines", str(stories_bundle), "--recipes-only", "--precision", "fp16",
                              "--out", str(out))
    assert code == 2 and stderr.count("\n") == 1 and "this bundle is fp32" in stderr  # an fp32 bundle makes fp32 engines


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
import adainfer.runtime as rt, adainfer.runtime.backends.tensorrt, adainfer.runtime.backends.ort_iobinding, adainfer.engines.build
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


@pytest.mark.gpu
@gpu
def test_early_exit_on_the_device_equals_the_cpu_runtime(tmp_path, calibrated_bundles):
    import dataclasses
    import shutil

    import adainfer.runtime as rt
    from adainfer.engines.build import build_engines
    from adainfer.runtime.device_exit import DeviceDecider
    from adainfer.runtime.early_exit import ExitDecider, load_policy, predict

    bundle = tmp_path / "b"
    shutil.copytree(calibrated_bundles["full-head"], bundle)
    build_engines(bundle, BuildOptions(precision="fp32", max_batch=1, max_seq=64, max_context=128), log=lambda _: None)
    cpu, gpu_model = rt.load(bundle), rt.load(bundle, backend="tensorrt")
    policy = load_policy(cpu)
    for shift in (0.0, -2.0):
        p = dataclasses.replace(policy, threshold=policy.threshold + shift)
        for prompt in ("Once upon a time", "The little dog was very happy because"):
            ids = cpu.encode(prompt)
            want, got = predict(cpu, ids, ExitDecider(cpu, p)), predict(gpu_model, ids, DeviceDecider(p, cpu.num_layers))
            assert (got.exit_layer, got.decisions, got.token) == (want.exit_layer, want.decisions, want.token)
    want = cpu.generate("Once upon a time", max_new_tokens=16, mode="early-exit")
    got = gpu_model.generate("Once upon a time", max_new_tokens=16, mode="early-exit")
    assert got.layers_per_token == want.layers_per_token and got.tokens == want.tokens
