"""The ways of running one model that `adainfer bench` compares; each does a prefill and greedy decode steps.

A contender has `name`, `layers` (blocks run per decoded token) and
`prefill(ids) -> (state, token)`, `step(state, token) -> token` (or `decode(ids, tokens)`, timed whole).
Each runs in its own worker process (`worker.py`), built there from a spec by `build_spec`: ours
(chain, monolithic graph) and `transformers` from a bundle, the peers a user would pick instead
(`GenAI`: onnxruntime-genai's own model builder output; `LlamaCpp`: llama-cpp-python on a GGUF)
from their own files, imported only in their worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


class Transformers:
    """`transformers` eager attention in torch at full depth, KV cache in its own `DynamicCache`."""

    def __init__(self, model, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch, self.model = torch, model.eval()
        self.name, self.layers = "transformers", model.config.num_hidden_layers

    def prefill(self, ids):
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), use_cache=True)
        return out.past_key_values, int(out.logits[0, -1].argmax())

    def step(self, state, token):
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([[token]]), past_key_values=state, use_cache=True)
        return int(out.logits[0, -1].argmax())


class Monolithic:
    """`model.onnx`, the whole model in one ONNX Runtime session; KV cache fed back as the outputs it got."""

    def __init__(self, bundle: Path, manifest, threads: int, spinning: bool = False):
        import onnxruntime as ort

        from ..exporter.monolithic import FILE, kv_input_names
        from ..runtime.sessions import session_options

        options = session_options(threads)
        if spinning:  # onnxruntime's defaults, for comparison
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(bundle) / FILE), options, providers=["CPUExecutionProvider"])
        self.kv_names = kv_input_names(manifest.num_layers)
        self.empty = np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), dtype=np.float32)
        self.name = "monolithic" + ("_spinning" if spinning else "")
        self.layers = manifest.num_layers

    def _run(self, ids: np.ndarray, position_ids: np.ndarray, length: int, past: list) -> tuple[list, int]:
        feeds = {"input_ids": ids, "position_ids": position_ids, "attention_mask": np.ones((1, length), dtype=np.int64)}
        feeds.update(zip(self.kv_names, past))
        out = self.session.run(None, feeds)
        return out[1:], int(out[0][0].argmax())

    def prefill(self, ids):
        n = len(ids)
        past, token = self._run(np.asarray([ids], dtype=np.int64), np.arange(n, dtype=np.int64)[None],
                                n, [self.empty] * len(self.kv_names))
        state = {"past": past, "length": n}
        return state, token

    def step(self, state, token):
        n = state["length"]
        state["past"], token = self._run(np.asarray([[token]], dtype=np.int64), np.asarray([[n]], dtype=np.int64),
                                         n + 1, state["past"])
        state["length"] = n + 1
        return token


class Spans:
    """Our bundle's own graphs with every block merged into one span graph (`exporter/spans.py`): embed, span,
    final head = 3 session calls per token instead of L + 2, the same kernels as the chain. The runtime does not
    run spans (yet): this shows what the chain's per-block calls cost. The span file is written into the
    bundle directory on first use."""

    def __init__(self, bundle: Path, manifest, threads: int, name: str):
        import onnxruntime as ort

        from ..exporter.spans import merge_blocks, span_name
        from ..runtime.sessions import session_options

        L = manifest.num_layers
        file = span_name(0, L - 1) + ".onnx"
        if not (Path(bundle) / file).is_file():
            merge_blocks(Path(bundle), [manifest.graphs[manifest.block_name(i)].file for i in range(L)], 0, file)

        def session(path):
            return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])

        self.embed = session(Path(bundle) / manifest.graphs["embed"].file)
        self.span = session(Path(bundle) / file)
        self.head = session(Path(bundle) / manifest.graphs["final_head"].file)
        self.embed_inputs = {i.name for i in self.embed.get_inputs()}
        self.empty = np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), dtype=np.float32)
        self.name, self.layers = name, L

    def _forward(self, ids: list[int], start: int, past: list) -> tuple[list, int]:
        n = len(ids)
        positions = np.arange(start, start + n, dtype=np.int64)[None]
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "position_ids": positions}
        (hidden,) = self.embed.run(None, {k: v for k, v in feeds.items() if k in self.embed_inputs})
        feeds = {"hidden_states": hidden, "position_ids": positions, "attention_mask": np.ones((1, start + n), np.int64)}
        for i in range(self.layers):
            feeds[f"past_key_{i:02d}"], feeds[f"past_value_{i:02d}"] = past[2 * i], past[2 * i + 1]
        out = self.span.run(None, feeds)
        (logits,) = self.head.run(None, {"hidden_states": np.ascontiguousarray(out[0][:, -1, :])})
        return out[1:], int(logits[0].argmax())

    def prefill(self, ids):
        past, token = self._forward(list(ids), 0, [self.empty] * (2 * self.layers))
        return {"past": past, "length": len(ids)}, token

    def step(self, state, token):
        state["past"], token = self._forward([token], state["length"], state["past"])
        state["length"] += 1
        return token


class Chain:
    """Our per-block chain (`adainfer.runtime`) at full depth: `Model.start` / `Model.step`."""

    def __init__(self, model):
        self.model, self.name, self.layers = model, "chain_full", model.num_layers

    def prefill(self, ids):
        state, logits = self.model.start([ids])
        return state, int(logits[0].argmax())

    def step(self, state, token):
        return int(self.model.step(state, [token])[0].argmax())


class EarlyExit:
    """Our chain stopping where an `ExitDecider` says, every token (`Model.run_layers` + final head).

    With a forced exit at layer k the blocks above k never run, so their caches are never read:
    this isolates what running k of L blocks costs.
    """

    def __init__(self, model, decider, name: str, layers: Optional[int] = None):
        self.model, self.decider, self.name = model, decider, name
        self.layers = layers if layers is not None else model.num_layers
        self.exit_layers: list[int] = []

    def _forward(self, state, ids: np.ndarray) -> int:
        run = self.model.run_layers(ids, state, None, self.decider)
        self.exit_layers.append(run.exit_layer)
        if run.token is not None:
            return int(run.token[0])
        return int(self.model.final_logits(run.hidden[:, -1, :])[0].argmax())

    def prefill(self, ids):
        state = self.model.new_state(1)
        return state, self._forward(state, np.asarray([ids], dtype=np.int64))

    def step(self, state, token):
        state.complete_layers = None  # upper caches are stale and never read again (forced exit)
        return self._forward(state, np.asarray([[token]], dtype=np.int64))


class Classifier:
    """Our chain with the bundle's calibrated exit classifier. Prefill: the next-token prediction
    stops where the classifier fires (`Model.run_layers` with the bundle's decider, as `predict`).
    Decode: `Model.generate(mode="early-exit")` greedy, time per token including its prompt's forward."""

    def __init__(self, model):
        self.model, self.name, self.layers = model, "chain_classifier", model.num_layers
        self.exit = EarlyExit(model, model.decider() if hasattr(model, "decider") else None, self.name)
        self.exit_layers = self.exit.exit_layers
        self.layers_per_token: list[float] = []

    def prefill(self, ids):
        return self.exit.prefill(ids)

    def decode(self, ids, tokens: int) -> None:
        try:
            out = self.model.generate(list(ids), max_new_tokens=tokens, mode="early-exit", stop_at_eos=False)
        except TypeError:  # an older runtime: early_exit=True
            out = self.model.generate(list(ids), max_new_tokens=tokens, early_exit=True, stop_at_eos=False)
        self.layers_per_token.append(sum(out.layers_per_token) / max(1, len(out.layers_per_token)))


class GenAI:
    """onnxruntime-genai (`og.Generator`) on its builder's output: greedy, `threads` intra-op threads.

    Prefill = `append_tokens(prompt)` (runs the prompt forward); a step = `generate_next_token()`.
    min_length = max_length keeps an end-of-sequence token from ending the timed decode early.
    """

    def __init__(self, model_dir: Path, threads: int, name: str, layers: int):
        import json

        import onnxruntime_genai as og

        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        config.clear_providers()  # CPU
        self.og, self.model, self.name, self.layers = og, og.Model(config), name, layers
        self.context = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["context_length"]

    def prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        length = min(self.context, len(ids) + 1024)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(list(ids))
        return generator, None

    def step(self, state, token):
        state.generate_next_token()
        return None


class LlamaCpp:
    """llama.cpp (`llama-cpp-python`) on the GGUF file: `eval(prompt)`, then greedy `eval([token])` steps."""

    def __init__(self, gguf: Path, threads: int, name: str, layers: int, context: int = 512):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                         logits_all=False, verbose=False)
        self.name, self.layers = name, layers

    def _next(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(list(ids))
        return None, self._next()

    def step(self, state, token):
        self.llm.eval([token])
        return self._next()


def forced_layers(num_layers: int) -> list[int]:
    """L/4, L/2, 3L/4 (at least 1, distinct, below L)."""
    layers = sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)})
    return [k for k in layers if k < num_layers]


def add_exit_spans(bundle: Path, layers: list[int]) -> None:
    """The spans a forced exit after each of `layers` blocks runs and the merged kv fill of the blocks it skips
    (what `adainfer calib` writes for a policy that evaluates there), added to `bench`'s own bundle before it is
    loaded: an exit at k is then embed -> span of k blocks -> final head, as a calibrated bundle runs it, not k
    block calls."""
    if not layers:
        return
    from ..exporter.span_writer import add_spans, exit_fills
    from ..manifest import Manifest
    from ..runtime.exit_policy import ExitPolicy
    from ..runtime.segments import policy_stops, span_ranges

    manifest = Manifest.load(bundle)
    L = manifest.num_layers
    ranges = [r for k in layers for r in span_ranges(L, policy_stops(ExitPolicy.forced(k), L))]
    add_spans(bundle, manifest, ranges, fills=exit_fills(L, layers))


def load_chain(bundle: Path, threads: int):
    from ..runtime import load

    return load(bundle, threads=threads, check_digests=False)


def build(name: str, bundle: Path, threads: int, model=None):
    """One of our contenders by name, on `bundle`: transformers, monolithic, monolithic_spinning, span_<precision>,
    chain_full
    (any chain_<precision> when `bundle` holds that precision), chain_exit@K, chain_classifier.
    `model` reuses an already loaded chain."""
    from ..manifest import Manifest
    from .shapes import BenchError, load_source_model

    manifest = Manifest.load(bundle)
    if name == "transformers":
        return Transformers(load_source_model(manifest.extras["bench_source"]), threads)
    if name.startswith("span_"):
        return Spans(bundle, manifest, threads, name)
    if name.startswith("monolithic"):
        contender = Monolithic(bundle, manifest, threads, spinning=name.endswith("spinning"))
        contender.name = name
        return contender
    model = model if model is not None else load_chain(bundle, threads)
    if "_exit@" in name and not name.startswith("chain_exit@"):  # chain_<precision>_exit@K: on that bundle
        from ..runtime.early_exit import ExitDecider
        from ..runtime.exit_policy import ExitPolicy

        k = int(name.split("@")[1])
        return EarlyExit(model, ExitDecider(model, ExitPolicy.forced(k)), name, layers=k)
    if name == "chain_full" or (name.startswith("chain_") and "@" not in name and name != "chain_classifier"):
        contender = Chain(model)
        contender.name = name
        return contender
    if name.startswith("chain_exit@"):
        from ..runtime.early_exit import ExitDecider
        from ..runtime.exit_policy import ExitPolicy

        k = int(name.split("@")[1])
        return EarlyExit(model, ExitDecider(model, ExitPolicy.forced(k)), name, layers=k)
    if name == "chain_classifier":
        return Classifier(model)
    raise BenchError(f"unknown contender {name!r}")


def build_specs(spec: dict) -> list:
    """The contenders of one worker: {"kind": "ours"|"genai"|"llamacpp", "names": [...], "path", "threads",
    "layers"}; ours share one loaded chain (full depth, forced exits, classifier)."""
    if spec["kind"] == "genai":
        return [GenAI(Path(spec["path"]), spec["threads"], spec["names"][0], spec["layers"])]
    if spec["kind"] == "llamacpp":
        return [LlamaCpp(Path(spec["path"]), spec["threads"], spec["names"][0], spec["layers"])]
    model = None
    out = []
    add_exit_spans(Path(spec["path"]), [int(n.split("@")[1]) for n in spec["names"] if "_exit@" in n])
    for name in spec["names"]:
        if name.startswith("chain") and model is None:
            model = load_chain(Path(spec["path"]), spec["threads"])
        out.append(build(name, Path(spec["path"]), spec["threads"], model=model))
    return out
