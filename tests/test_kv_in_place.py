"""The cpu backend's graphs with the KV cache appended in place (runtime/kv_in_place.py): the full step, spans,
single blocks and kv fills give the same logits and caches as every block run on its own, plainly, through
buffer growth, early exits, forks and rollbacks, and leave every layer's cache in the buffers."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import adainfer.runtime as rt
from adainfer.bench.contenders import add_exit_spans
from adainfer.runtime import chain, kv_in_place
from adainfer.runtime.decoding import EarlyExitDecoder, Sampler
from adainfer.runtime.exit_policy import ExitPolicy

IDS = [1, 45, 300, 12, 77, 9]


def caches_equal(a, b, layers: int) -> float:
    worst = 0.0
    for i in range(layers):
        (ka, va), (kb, vb) = a.layer(i), b.layer(i)
        assert ka.shape == kb.shape and va.shape == vb.shape, (i, ka.shape, kb.shape)
        worst = max(worst, float(np.abs(ka - kb).max()), float(np.abs(va - vb).max()))
    return worst


@pytest.fixture
def models(stories_bundle, monkeypatch):
    monkeypatch.setattr(kv_in_place, "START_CAPACITY", 4)  # the buffers grow 6 (the prompt) -> 12 -> 24 -> 48 below
    fast, plain = rt.load(stories_bundle), rt.load(stories_bundle, spans=False)
    assert fast.backend.in_place and not plain.backend.runs_full_step
    yield fast, plain
    fast.close()
    plain.close()


def test_in_place_steps_equal_blocks_through_buffer_growth(models):
    fast, plain = models
    state_a, logits_a = fast.start([IDS])
    state_b, logits_b = plain.start([IDS])
    capacities = set()
    for step in range(24):
        token = int(logits_b[0].argmax())
        logits_a, logits_b = fast.step(state_a, [token]), plain.step(state_b, [token])
        assert np.abs(logits_a - logits_b).max() <= 1e-5, step
        capacities.add(state_a.in_place.capacity)
    assert capacities == {12, 24, 48}
    assert caches_equal(state_a, state_b, fast.num_layers) <= 1e-5
    held = fast.step(state_a, [1])  # logits handed out are not overwritten by the next step (no growth between)
    kept = held.copy()
    fast.step(state_a, [2])
    assert np.array_equal(held, kept)
    assert state_a.layer(0)[0].shape[2] == len(IDS) + 26
    assert fast.session_calls["full_step"] == 27 and fast.session_calls["block_00"] == 0


def test_early_exit_steps_between_in_place_steps_are_copied_back_in(models):
    """A forced exit after 2 blocks (blocks + kv fill replace the cache's arrays), then full steps again."""
    fast, plain = models
    forced = ExitPolicy.forced(2)
    results = []
    for model in (fast, plain):
        decider = model.backend.make_decider(model, forced)
        early = EarlyExitDecoder(model, Sampler(0.0, 1.0, np.random.default_rng(0)), decider)
        state, logits = model.start([IDS])
        out = []
        for step in range(6):
            token = int(logits[0].argmax())
            if step % 3 == 1:
                logits, layers, _ = early.step(state, token)
                assert layers == 2
            else:
                logits = model.step(state, [token])
            out.append(logits)
        results.append((state, out))
    (state_a, out_a), (state_b, out_b) = results
    assert max(float(np.abs(a - b).max()) for a, b in zip(out_a, out_b)) <= 1e-5
    assert caches_equal(state_a, state_b, fast.num_layers) <= 1e-5


def test_a_fork_and_a_rollback_keep_their_own_cache(models):
    fast, plain = models
    state_a, _ = fast.start([IDS])
    state_b, _ = plain.start([IDS])
    for token in (5, 6, 7):
        fast.step(state_a, [token])
        plain.step(state_b, [token])
    fork_a, fork_b = state_a.fork(), state_b.fork()
    state_a.truncate(len(IDS) + 1)  # the parent rolls back and goes on in its buffers, over positions the fork holds ...
    state_b.truncate(len(IDS) + 1)
    for token in (8, 9):
        fast.step(state_a, [token])
        plain.step(state_b, [token])
    for token in (20, 21, 22):  # ... the fork, from where it was, in buffers of its own
        la, lb = fast.step(fork_a, [token]), plain.step(fork_b, [token])
        assert np.abs(la - lb).max() <= 1e-5
    assert caches_equal(fork_a, fork_b, fast.num_layers) <= 1e-5
    assert caches_equal(state_a, state_b, fast.num_layers) <= 1e-5
    state_a.truncate(len(IDS) + 2)  # roll back to after tokens 5 and 8, then step again in place
    state_b.truncate(len(IDS) + 2)
    for buffers in state_a.in_place.buffers:  # the truncated views are the buffers' first positions: nothing is
        for buffer in buffers:                # copied back (read-only to numpy, a copy raises; ONNX Runtime
            buffer.flags.writeable = False    # writes through its pointers)
    la, lb = fast.step(state_a, [11]), plain.step(state_b, [11])
    assert np.abs(la - lb).max() <= 1e-5
    assert caches_equal(state_a, state_b, fast.num_layers) <= 1e-5
    assert in_buffers(state_a, fast.num_layers)


def test_a_padded_batch_runs_its_prompt_plainly_and_its_steps_in_place(models):
    fast, plain = models
    prompts = [IDS, [1, 400, 401]]
    state_a, logits_a = fast.start(prompts)
    state_b, logits_b = plain.start(prompts)
    assert state_a.in_place is None  # GroupQueryAttention takes several new tokens on a cache for one row only
    for _ in range(4):
        tokens = [int(t) for t in logits_b.argmax(axis=1)]
        logits_a, logits_b = fast.step(state_a, tokens), plain.step(state_b, tokens)
        assert np.abs(logits_a - logits_b).max() <= 1e-5
    assert state_a.in_place is not None and state_a.in_place.shape[0] == 2
    assert caches_equal(state_a, state_b, fast.num_layers) <= 1e-5


@pytest.fixture(scope="module")
def head16_bundle(tmp_path_factory):
    """A random-weight Llama with 16-wide heads (ONNX Runtime rotates inside GroupQueryAttention for multiples of
    16 only: stories260K's heads are 8 wide, SmolLM2's 64)."""
    import torch
    import transformers as tf

    from adainfer.exporter import export_model
    from conftest import tiny_config

    config = tiny_config("llama")
    config.num_attention_heads, config.head_dim = 4, 16
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    out = tmp_path_factory.mktemp("head16") / "bundle"
    export_model(model, out, progress=False)
    return out


def test_merged_graphs_rotate_inside_their_attention_and_serve_unpadded_batches_only(head16_bundle, stories_bundle):
    """The full step's and the spans' GroupQueryAttention rotates q/k itself from packed q/k/v (rotary_fold.py), by
    cache slot: a padded batch must not run them, or its padded row's keys would sit at other positions than the
    blocks and kv fills rotate them to. A padded batch's prompt and a step through `run_layers` (blocks only: no
    full step, no span) equal every block run plainly; an unpadded batch of two runs the full step and the span and
    equals it too. Heads 8 wide (stories260K) keep their RotaryEmbedding nodes."""
    for graph in ("full_step.onnx", "span_00_02.onnx"):
        full = onnx.load(str(head16_bundle / graph), load_external_data=False)
        attention = [n for n in full.graph.node if n.op_type == "GroupQueryAttention"]
        ops = [n.op_type for n in full.graph.node]
        assert len(attention) == 3 and "RotaryEmbedding" not in ops and ops.count("Split") == 3  # gate/up's only
        for node in attention:
            assert node.input[1] == node.input[2] == "" and node.input[7].endswith("cos_cache")
            assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "do_rotary")) == 1
    narrow = onnx.load(str(stories_bundle / "full_step.onnx"), load_external_data=False)
    assert [n.op_type for n in narrow.graph.node].count("RotaryEmbedding") == 10
    fast, plain = rt.load(head16_bundle), rt.load(head16_bundle, spans=False)
    for prompts, merged in (([IDS, [1, 400, 401]], 0), ([IDS, IDS[::-1]], 1)):
        before = dict(fast.session_calls)
        state_a, logits_a = fast.start(prompts)
        state_b, logits_b = plain.start(prompts)
        assert fast.session_calls["full_step"] - before.get("full_step", 0) == merged
        assert np.abs(logits_a - logits_b).max() <= 1e-5
        tokens = np.asarray([[int(t)] for t in logits_b.argmax(axis=1)], dtype=np.int64)
        runs = [m.run_layers(tokens, s, np.ones_like(tokens)) for m, s in ((fast, state_a), (plain, state_b))]
        assert fast.session_calls["span_00_02"] - before.get("span_00_02", 0) == merged
        got, want = (m.final_logits(r.hidden[:, -1, :]) for m, r in zip((fast, plain), runs))
        assert np.abs(got - want).max() <= 1e-5
        assert caches_equal(state_a, state_b, fast.num_layers) <= 1e-5
    state_a, logits_a = fast.start([IDS])  # one row: the full step, in place, step after step
    state_b, logits_b = plain.start([IDS])
    for _ in range(3):
        token = [int(logits_b.argmax())]
        logits_a, logits_b = fast.step(state_a, token), plain.step(state_b, token)
        assert np.abs(logits_a - logits_b).max() <= 1e-5
    assert fast.session_calls["full_step"] == 1 + 1 + 3 and in_buffers(state_a, fast.num_layers)
    fast.close()
    plain.close()


def test_only_graphs_whose_caches_come_from_group_query_attention_append_in_place(stories_bundle, tmp_path):
    assert kv_in_place.supports(stories_bundle / "full_step.onnx", range(5))
    assert kv_in_place.supports(stories_bundle / "block_03.onnx", [3], kv_in_place.plain)
    x = helper.make_tensor_value_info("past_key_00", TensorProto.FLOAT, [1, 1, None, 4])
    y = helper.make_tensor_value_info("new", TensorProto.FLOAT, [1, 1, None, 4])
    out = helper.make_tensor_value_info("present_key_00", TensorProto.FLOAT, [1, 1, None, 4])
    out_v = helper.make_tensor_value_info("present_value_00", TensorProto.FLOAT, [1, 1, None, 4])
    graph = helper.make_graph([helper.make_node("Concat", ["past_key_00", "new"], ["present_key_00"], axis=2),
                               helper.make_node("Identity", ["present_key_00"], ["present_value_00"])],
                              "concat", [x, y], [out, out_v])
    onnx.save(helper.make_model(graph), tmp_path / "concat.onnx")
    assert not kv_in_place.supports(tmp_path / "concat.onnx", [0])


def in_buffers(state, layers: int) -> bool:
    """Whether every layer's keys and values are views of the cache's in-place buffers."""
    buffers = state.in_place.buffers
    return all(np.shares_memory(state.keys[i], buffers[0][i]) and np.shares_memory(state.values[i], buffers[1][i])
               for i in range(layers))


@pytest.mark.parametrize("exit_spans", [False, True], ids=["blocks", "span"])
def test_early_exits_run_their_blocks_and_kv_fills_in_place(stories_bundle, tmp_path, monkeypatch, exit_spans):
    """Forced exits after 2 of 5 blocks, the prompt's and then generating (the kv fill gives blocks 3-5 each
    token's keys and values), with full steps between: through blocks 1 and 2 alone, or through a span of both
    (`exit_spans`, with the kv fill of blocks 3-5 as one graph). The prompt's 6 positions, then 1 a step: the bound
    outputs change shape."""
    bundle = tmp_path / "bundle"
    shutil.copytree(stories_bundle, bundle)
    if exit_spans:
        add_exit_spans(bundle, [2])
    monkeypatch.setattr(kv_in_place, "START_CAPACITY", 8)  # grows 6 -> 16 -> 32 below
    fast, plain = rt.load(bundle), rt.load(bundle, spans=False)
    layers = fast.num_layers
    if exit_spans:  # a merged kv fill is checked against the manifest and made on first use, not at load
        assert fast.backend.sessions.outputs["kv_fill_02_04"] is None
    results = []
    for model in (fast, plain):
        decider = model.backend.make_decider(model, ExitPolicy.forced(2))
        early = EarlyExitDecoder(model, Sampler(0.0, 1.0, np.random.default_rng(0)), decider)
        state, ids = model.new_state(1), np.asarray([IDS], dtype=np.int64)  # the prompt exits too: 6 positions
        run = chain.run_layers(model.backend, ids, state, np.ones_like(ids), decider)
        chain.fill_skipped(model.backend, state, run)
        logits = chain.last_logits(model.backend, run)
        out = []
        for step in range(14):
            token = int(logits[0].argmax())
            if step % 4 == 3:
                logits = model.step(state, [token])
            else:
                logits, exit_layer, _ = early.step(state, token)
                assert exit_layer == 2
            out.append(logits)
            if model is fast:
                assert in_buffers(state, layers), step  # nothing was concatenated outside the buffers
        results.append((state, out))
    (state_a, out_a), (state_b, out_b) = results
    assert max(float(np.abs(a - b).max()) for a, b in zip(out_a, out_b)) <= 1e-5
    assert caches_equal(state_a, state_b, layers) <= 1e-5
    assert state_a.in_place.capacity == 32
    calls = fast.session_calls  # the prompt's exit, 11 more, 3 full steps
    if exit_spans:  # the bench's exit spans: blocks 1-2 as one graph, the kv fill of 3-5 as one graph
        assert calls["span_00_01"] == 12 and calls["block_00"] == calls["block_01"] == 0
        assert calls["kv_fill_02_04"] == 12 and calls["kv_fill_02"] == calls["kv_fill_04"] == 0
    else:
        assert calls["block_00"] == calls["block_01"] == 12
        assert calls["kv_fill_02"] == calls["kv_fill_04"] == 12
    assert calls["full_step"] == 3
    fast.close()
    plain.close()


def test_a_merged_kv_fill_that_is_not_the_manifests_is_refused_when_first_used(stories_bundle, tmp_path):
    """Merged kv fills are checked against the manifest when first made (not at load): one whose graph gives
    another dtype than the manifest states is refused in one line the first time an exit needs it."""
    import json

    from adainfer.errors import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(stories_bundle, bundle)
    add_exit_spans(bundle, [2])
    data = json.loads((bundle / "manifest.json").read_text())
    data["graphs"]["kv_fill_02_04"]["outputs"][0]["dtype"] = "float16"
    (bundle / "manifest.json").write_text(json.dumps(data))
    model = rt.load(bundle)  # loads: the merged fill is not checked yet
    with pytest.raises(BundleError, match="kv_fill_02_04.onnx outputs"):
        model.generate(IDS, max_new_tokens=3, mode="early-exit", policy=ExitPolicy.forced(2), stop_at_eos=False)
    model.close()


def test_in_place_calls_read_their_outputs_without_wrapping_every_output(stories_bundle, monkeypatch):
    """The full step binds 2 x L caches as outputs besides its logits; ONNX Runtime's public `get_outputs` wraps all
    of them in Python objects every call (79 us on SmolLM2), so the runtime reads the binding's own list: with the
    public one broken, generation in place still equals plain blocks. A binding without that list falls back."""
    import onnxruntime as ort

    plain = rt.load(stories_bundle, spans=False)
    want = plain.generate(IDS, max_new_tokens=5, stop_at_eos=False).tokens
    monkeypatch.setattr(ort.IOBinding, "get_outputs", lambda self: (_ for _ in ()).throw(AssertionError("wrapped")))
    fast = rt.load(stories_bundle)
    assert fast.generate(IDS, max_new_tokens=5, stop_at_eos=False).tokens == want
    assert fast.session_calls["full_step"] == 5

    class Public:  # an ONNX Runtime whose IOBinding has no inner list
        def get_outputs(self):
            return ["public"]

    assert kv_in_place._bound_outputs(Public()) == ["public"]
    fast.close()
    plain.close()


def test_a_decode_step_binds_only_its_mask(models, monkeypatch):
    """After a binding's first calls, a step copies its token ids and positions into arrays bound once and reads
    its logits from an array bound once (each binding call costs 20-40 us after a graph run on SmolLM2): one
    `bind_cpu_input` (the mask, a new shape each step), no other binding call; the logits are still the plain
    blocks' and each step's are an array of their own."""
    import onnxruntime as ort

    fast, plain = models
    state_a, _ = fast.start([IDS])
    state_b, logits_b = plain.start([IDS])
    for token in (3, 4, 5, 6, 7, 8, 9, 10):  # past the growth to 24 (at 13 positions): new bindings, then steady
        fast.step(state_a, [token])
        logits_b = plain.step(state_b, [token])
    calls = []
    for name in ("bind_cpu_input", "bind_input", "bind_output", "bind_ortvalue_input", "bind_ortvalue_output"):
        original = getattr(ort.IOBinding, name)
        monkeypatch.setattr(ort.IOBinding, name,
                            lambda self, *a, _f=original, _n=name, **k: (calls.append((self, _n)), _f(self, *a, **k))[1])
    seen = []
    for token in (11, 12, 13):
        logits_a, logits_b = fast.step(state_a, [token]), plain.step(state_b, [token])
        assert np.abs(logits_a - logits_b).max() <= 1e-5
        seen.append(logits_a)
    full_step = state_a.in_place.bound["full_step"].binding
    assert calls == [(full_step, "bind_cpu_input")] * 3
    assert not np.shares_memory(seen[0], seen[1]) and not np.shares_memory(seen[1], seen[2])
    assert state_a.in_place.capacity == 24 and state_a.length == len(IDS) + 11


def test_a_decode_steps_mask_and_positions_equal_a_mask_of_ones():
    """`KVState.advance(None, new)` (every new token real: the decode step's few numpy calls) gives what a mask of
    ones gives; `unpadded` follows padding in, a rollback past it and a fork."""
    from adainfer.runtime.backends.cpu import HostKVCache

    a, b = HostKVCache.empty(1, 2, 1, 4, np.float32), HostKVCache.empty(1, 2, 1, 4, np.float32)
    prompt = np.array([[0, 1, 1], [1, 1, 1]])
    assert np.array_equal(a.advance(prompt), b.advance(prompt))
    assert not a.unpadded
    for new in (1, 3, 1):
        pa, pb = a.advance(None, new), b.advance(np.ones((2, new), dtype=np.int64))
        assert np.array_equal(pa, pb) and pa.dtype == np.int64 and pa.shape == (2, new)
        assert np.array_equal(a.attention_mask, b.attention_mask) and np.array_equal(a.next_position, b.next_position)
    assert a.next_position.tolist() == [7, 8] and not a.unpadded
    fork = a.fork()
    a.truncate(1)
    assert not a.unpadded and not fork.unpadded
    c = HostKVCache.empty(1, 1, 1, 4, np.float32)
    c.advance(np.array([[1, 1]]))
    c.advance(np.array([[0]]))
    assert not c.unpadded
    c.truncate(2)
    assert c.unpadded and c.fork().unpadded
    assert c.advance(None).tolist() == [[2]]
