"""One suite, every backend: the same checks on each runtime that can run here.

Backends: `cpu` (ONNX Runtime, KV cache in numpy), `cpu-iobinding` (ONNX Runtime with I/O binding
on the CPU device: the ort-cuda / ort-trt binding code, KV cache in preallocated buffers bound by
address), `tensorrt-on-ort` (the tensorrt backend's own code with its engines stood in for by ONNX
Runtime sessions behind TensorRT's context API, in host memory: tests/fake_engines.py; it checks
the backend's logic, not TensorRT), and `ort-cuda`, `ort-trt`, `tensorrt` on a GPU, which skip
here with their reason (no GPU is not a pass).

Bundles carry the full-depth span (`span_00_LL`), which `cpu` and `cpu-iobinding` run by default;
`cpu/blocks` and `cpu-iobinding/blocks` load with `spans=False` (every block its own call).

Checks: logits at every step equal transformers' (random-weight tiny Llama, and stories260K);
a batch of two left-padded prompts equals each prompt alone; early exit exits where the policy
says and fills the skipped layers' cache exactly as the cpu backend does; speculative decoding
gives the full-depth tokens; fork and truncate give independent, exact caches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adainfer.runtime as rt
from adainfer.errors import InputError
from adainfer.runtime.decoding import EarlyExitDecoder, Sampler
from adainfer.runtime.exit_policy import ExitPolicy
from conftest import tiny_model

CPU_BACKENDS = ["cpu", "cpu-iobinding", "tensorrt-on-ort", "cpu/blocks", "cpu-iobinding/blocks"]
GPU_BACKENDS = ["ort-cuda", "ort-trt", "tensorrt"]
ALL = CPU_BACKENDS + GPU_BACKENDS


def gpu_reason(name: str):
    """Why a GPU backend cannot run here, or None when it can."""
    import onnxruntime as ort

    if name in ("ort-cuda", "ort-trt"):
        wanted = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}[name]
        if wanted not in ort.get_available_providers():
            return f"{name}: no GPU here (this onnxruntime has no {wanted}); not run, not passed"
    try:
        from adainfer.runtime import cuda_rt

        cuda_rt.require_gpu(need_tensorrt=name == "tensorrt")
    except Exception as exc:
        return f"{name}: no GPU here ({exc}); not run, not passed"
    return None


def load(bundle, name: str, tmp_path_factory=None):
    if name in GPU_BACKENDS:
        reason = gpu_reason(name)
        if reason:
            pytest.skip(reason)
    if name == "tensorrt-on-ort":
        from adainfer.runtime.backends.tensorrt import TensorRTBackend
        from adainfer.runtime.bundle import open_bundle
        from adainfer.runtime.device_memory import HostMemory
        from adainfer.runtime.model import Model
        from adainfer.runtime.profiles import BuildOptions
        from fake_engines import fake_engines

        b = open_bundle(bundle)
        engines = fake_engines(bundle, BuildOptions(max_batch=2, max_seq=32, max_context=64))
        return Model(b, TensorRTBackend(b, memory=HostMemory(), engines=engines))
    if name == "tensorrt":
        import shutil

        from adainfer.engines.build import build_engines
        from adainfer.runtime.profiles import BuildOptions

        copy = tmp_path_factory.mktemp("trt") / "b"
        shutil.copytree(bundle, copy)
        build_engines(copy, BuildOptions(max_batch=2, max_seq=32, max_context=64), log=lambda _: None)
        bundle = copy
    if name.endswith("/blocks"):
        return rt.load(bundle, backend=name.removesuffix("/blocks"), spans=False)
    return rt.load(bundle, backend=name)


def graphs_run(model) -> set:
    return {g for g, n in model.session_calls.items() if n}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adainfer.exporter import export_model

    hf = tiny_model("llama")
    out = tmp_path_factory.mktemp("conformance") / "tiny-llama"
    export_model(hf, out)
    return out, hf


@pytest.fixture(scope="module", params=["tiny", "stories"])
def case(request, tiny, stories_bundle, stories_hf):
    return tiny if request.param == "tiny" else (stories_bundle, stories_hf)


def reference_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float().numpy()


@pytest.mark.parametrize("name", ALL)
def test_logits_equal_transformers_at_every_step(name, case, tmp_path_factory):
    bundle, hf = case
    model = load(bundle, name, tmp_path_factory)
    ids = [1, 45, 300, 12, 77, 9]
    state, logits = model.start([ids])
    seq = list(ids)
    worst = 0.0
    for _ in range(8):
        want = reference_logits(hf, seq)
        worst = max(worst, float(np.abs(logits[0] - want).max() / max(1.0, np.abs(want).max())))
        token = int(want.argmax())
        seq.append(token)
        logits = model.step(state, [token])
    assert worst < 1e-4, worst
    merged = {g for g in graphs_run(model) if g.startswith("span_") or g == "full_step"}
    full_depth = {"cpu": {"full_step"}, "cpu-iobinding": {f"span_00_{model.num_layers - 1:02d}"}}  # one graph, or a span
    assert merged == full_depth.get(name, set()), merged
    assert state.length == len(seq) and all(state.layer(i)[0].shape[2] == len(seq) for i in range(model.num_layers))


@pytest.mark.parametrize("name", ALL)
def test_a_padded_batch_of_two_equals_each_prompt_alone(name, tiny, tmp_path_factory):
    bundle, _ = tiny
    model = load(bundle, name, tmp_path_factory)
    prompts = [[1, 45, 300, 12, 77, 9], [1, 8, 400]]
    state, logits = model.start(prompts)
    alone = [model.start([p]) for p in prompts]
    for row, (_, want) in enumerate(alone):
        np.testing.assert_allclose(logits[row], want[0], atol=1e-4)
    assert state.attention_mask.tolist()[1] == [0, 0, 0, 1, 1, 1]
    for step in range(3):
        tokens = [int(logits[0].argmax()), int(logits[1].argmax())]
        logits = model.step(state, tokens)
        for row, (s, _) in enumerate(alone):
            want = model.step(s, [tokens[row]])
            np.testing.assert_allclose(logits[row], want[0], atol=1e-4, err_msg=f"step {step} row {row}")


@pytest.mark.parametrize("name", ALL)
def test_early_exit_exits_and_fills_the_skipped_layers_like_the_cpu_backend(name, stories_bundle, tmp_path_factory):
    model, cpu = load(stories_bundle, name, tmp_path_factory), rt.load(stories_bundle)
    policy = ExitPolicy.forced(2)
    ids = cpu.encode("Once upon a time")
    want = cpu.generate(ids, max_new_tokens=10, mode="early-exit", policy=policy)
    got = model.generate(ids, max_new_tokens=10, mode="early-exit", policy=policy)
    assert got.tokens == want.tokens and got.layers_per_token == want.layers_per_token
    assert got.layers_per_token[1:] == [2] * 9  # every decoded token exited after block 2 (the prompt runs at full depth)
    sampler = Sampler(0.0, 1.0, np.random.default_rng(0))
    states = []
    for m in (cpu, model):
        state, logits = m.start([ids])
        decoder = EarlyExitDecoder(m, sampler, m.backend.make_decider(m, policy))
        for _ in range(3):
            logits, layers, _ = decoder.step(state, int(logits[0].argmax()))
            assert layers == 2
        states.append(state)
    for layer in range(cpu.num_layers):
        for a, b in zip(states[0].layer(layer), states[1].layer(layer)):
            assert a.shape == b.shape == (1, cpu.manifest.num_kv_heads, len(ids) + 3, cpu.manifest.head_dim)
            np.testing.assert_allclose(b, a, atol=1e-5, err_msg=f"layer {layer}")


@pytest.mark.parametrize("name", ALL)
def test_speculative_decoding_gives_the_full_depth_tokens(name, stories_bundle, tmp_path_factory):
    model = load(stories_bundle, name, tmp_path_factory)
    ids = model.encode("Once upon a time")
    full = model.generate(ids, max_new_tokens=24).tokens
    if not getattr(model.backend, "multi_token_steps", True):
        with pytest.raises(InputError, match="speculative"):
            model.generate(ids, max_new_tokens=24, mode="speculative", policy=ExitPolicy.forced(3))
        return
    for policy in (ExitPolicy.forced(3), ExitPolicy.rule(0.5)):
        stats: dict = {}
        tokens = [e.token for e in model.stream(ids, 24, mode="speculative", policy=policy, max_draft=3, stats=stats)]
        assert tokens == full, policy.name
    assert stats["acceptance_rate"] is not None


@pytest.mark.parametrize("name", ALL)
def test_fork_and_truncate_give_independent_exact_caches(name, tiny, tmp_path_factory):
    bundle, _ = tiny
    model = load(bundle, name, tmp_path_factory)
    state, logits = model.start([[1, 45, 300, 12]])
    before = [tuple(a.copy() for a in state.layer(i)) for i in range(model.num_layers)]
    fork = state.fork()
    for token in (5, 6, 7):
        model.step(fork, [token])
    assert fork.length == 7 and state.length == 4
    for i in range(model.num_layers):  # the original did not move
        for a, b in zip(before[i], state.layer(i)):
            np.testing.assert_array_equal(a, b)
    fork.truncate(4)
    for i in range(model.num_layers):
        for a, b in zip(before[i], fork.layer(i)):
            np.testing.assert_array_equal(a, b)
    assert fork.next_position.tolist() == state.next_position.tolist() == [4]
    np.testing.assert_allclose(model.step(fork, [9]), model.step(state, [9]), atol=1e-6)
    fork.close()
    state.close()


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_new_caches_take_the_block_graphs_kv_dtype(name, tiny, tmp_path_factory):
    from adainfer.runtime.backend import kv_dtype

    bundle, _ = tiny
    model = load(bundle, name, tmp_path_factory)
    keys, values = model.new_state(2).layer(0)
    assert keys.dtype == values.dtype == kv_dtype(model.manifest) == np.float32
    assert keys.shape == (2, model.manifest.num_kv_heads, 0, model.manifest.head_dim)
