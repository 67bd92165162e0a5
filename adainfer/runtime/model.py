"""The chain: embedding -> block_00 ... block_NN -> head, with the KV cache kept in numpy.

Read top to bottom like llama2.c's forward pass. Batches are left-padded: every row's
last position is the newest token, and position ids count real tokens only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import BundleError, InputError
from .bundle import Bundle, open_bundle
from .limits import (check_decoding, check_memory, check_options, check_text, check_threads, fit_prompt,
                     prompt_batch, step_ids, token_ids)
from .sessions import DEFAULT_PROVIDERS, make_session
from .tokenizer import StreamDecoder, TextTokenizer


@dataclass
class DecodeState:
    """What a batch of sequences carries between steps: per-layer keys and values, mask, next position."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    attention_mask: np.ndarray  # (batch, total_length) int64, 0 = padding
    next_position: np.ndarray  # (batch,) int64
    complete_layers: Optional[int] = None  # < num_layers after an early exit: upper caches lack the last step

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def advance(self, step_mask: np.ndarray) -> np.ndarray:
        """Append a step's padding mask (batch, seq); returns its position ids, which count real tokens only."""
        self.attention_mask = np.concatenate([self.attention_mask, step_mask], axis=1)
        position_ids = np.maximum(self.next_position[:, None] + np.cumsum(step_mask, axis=1) - 1, 0).astype(np.int64)
        self.next_position = self.next_position + step_mask.sum(axis=1)
        return position_ids


@dataclass
class LayerRun:
    """Where a pass through the blocks ended: hidden states (batch, seq, hidden) after `exit_layer`."""

    hidden: np.ndarray
    position_ids: np.ndarray
    exit_layer: int
    decisions: int
    token: Optional[np.ndarray]  # top-1 ids from the exit head when it decided, else None


@dataclass
class Generation:
    """The result of `Model.generate`."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    new_tokens: int
    layers_per_token: list[int]
    seconds: float
    stop_reason: str
    mode: str = "full"
    macs_per_token: float = 0.0  # blocks, heads, exit decisions and cache fills, averaged over new tokens
    decision_macs_per_token: float = 0.0
    acceptance_rate: Optional[float] = None  # speculative: accepted drafts / drafted tokens
    rejected_rounds: Optional[int] = None

    @property
    def mean_layers_per_token(self) -> float:
        return float(np.mean(self.layers_per_token)) if self.layers_per_token else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "layers_per_token": self.layers_per_token,
                "seconds": self.seconds, "stop_reason": self.stop_reason, "mode": self.mode,
                "mean_layers_per_token": self.mean_layers_per_token, "macs_per_token": self.macs_per_token,
                "decision_macs_per_token": self.decision_macs_per_token, "acceptance_rate": self.acceptance_rate,
                "rejected_rounds": self.rejected_rounds, "tokens_per_second": self.tokens_per_second}


@dataclass
class StreamEvent:
    token: int
    text: str
    layers: int


class Sessions(Mapping):
    """One ONNX Runtime session per graph, by graph name; the graphs only early exit needs (the exit
    head, the kv_fill graphs) get theirs on first use, so a full-depth generation never holds them
    (the exit head is a whole LM head: 113 MB of weights, prepacked, on SmolLM2). Every graph's
    interface is checked against the manifest at load all the same, by a session that skips graph
    optimization and weight prepacking (weights in external data are mapped, not read)."""

    LAZY = ("exit_head", "kv_fill_")

    def __init__(self, bundle: Bundle, providers: Sequence, threads: Optional[int]):
        self.bundle, self.providers, self.threads = bundle, providers, threads
        self._sessions: dict = {}
        self._lock = threading.Lock()
        names = list(bundle.manifest.graphs)
        self.inputs = dict.fromkeys(names)  # manifest order for iteration; filled below
        self.outputs = dict.fromkeys(names)
        # the heads and the embedding first: loading a graph holds its raw weights and their prepacked
        # copy for a moment, so the vocabulary-sized ones go while little else is resident (peak RSS)
        for name in sorted(names, key=lambda n: n not in ("final_head", "exit_head", "embed")):
            lazy = name.startswith(self.LAZY)
            session = make_session(bundle.graph_path(name), providers, threads, light=lazy)
            bundle.check_session(name, session)  # the graphs' real interfaces match the manifest
            self.inputs[name] = [i.name for i in session.get_inputs()]
            self.outputs[name] = [o.name for o in session.get_outputs()]
            if not lazy:
                self._sessions[name] = session
            del session

    def __getitem__(self, name: str):
        session = self._sessions.get(name)
        if session is None:
            if name not in self.inputs:
                raise KeyError(name)
            with self._lock:
                session = self._sessions.get(name)
                if session is None:
                    session = self._sessions[name] = make_session(self.bundle.graph_path(name), self.providers, self.threads)
        return session

    def __iter__(self):
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def __contains__(self, name) -> bool:
        return name in self.inputs

    def loaded(self) -> list[str]:
        """Names of the graphs whose full sessions exist now."""
        return list(self._sessions)


class Model:
    """A loaded bundle. Thread-safe for concurrent generations: each owns its `DecodeState`."""

    def __init__(self, bundle: Bundle, providers: Sequence = DEFAULT_PROVIDERS, threads: Optional[int] = None):
        self.bundle = bundle
        self.manifest = m = bundle.manifest
        self.sessions = Sessions(bundle, providers, threads)
        self._inputs, self._outputs = self.sessions.inputs, self.sessions.outputs
        tok = bundle.tokenizer_path
        self.tokenizer = TextTokenizer(tok) if tok is not None else None
        self.num_layers = m.num_layers
        self.session_calls: dict[str, int] = {name: 0 for name in m.graphs}
        self._decider = None  # the calibrated exit decider, loaded on first early-exit use

    # ------------------------------------------------------------------ graphs

    def _run(self, graph: str, **feeds: np.ndarray) -> list[np.ndarray]:
        self.session_calls[graph] += 1
        return self.sessions[graph].run(self._outputs[graph], {n: feeds[n] for n in self._inputs[graph]})

    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        (hidden,) = self._run("embed", input_ids=input_ids, position_ids=position_ids)
        return hidden

    def block(self, layer: int, hidden: np.ndarray, position_ids: np.ndarray, state: DecodeState) -> np.ndarray:
        """Run one decoder block and append this step's keys and values to the state."""
        hidden, state.keys[layer], state.values[layer] = self._run(
            self.manifest.block_name(layer), hidden_states=hidden, position_ids=position_ids,
            attention_mask=state.attention_mask, past_key=state.keys[layer], past_value=state.values[layer])
        return hidden

    def final_logits(self, hidden_last: np.ndarray) -> np.ndarray:
        (logits,) = self._run("final_head", hidden_states=np.ascontiguousarray(hidden_last, dtype=np.float32))
        return logits

    def exit_features(self, hidden_last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top-1 id, top-1 prob, gap) of the distribution the LM head gives this hidden state."""
        top1, prob, gap = self._run("exit_head", hidden_states=np.ascontiguousarray(hidden_last, dtype=np.float32))
        return top1, prob, gap

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: np.ndarray, state: DecodeState, step_mask: np.ndarray) -> np.ndarray:
        """Feed `input_ids` (batch, seq) through every block; returns the last position's logits."""
        return self.final_logits(self.run_layers(input_ids, state, step_mask).hidden[:, -1, :])

    def run_layers(self, input_ids: np.ndarray, state: DecodeState, step_mask: np.ndarray, decider=None) -> "LayerRun":
        """Embed and run the blocks in order; with a `decider` (early exit), stop where it says."""
        position_ids = state.advance(step_mask)

        hidden = self.embed(input_ids, position_ids)
        previous = hidden[:, -1, :]
        decisions = 0
        for layer in range(1, self.num_layers + 1):
            hidden = self.block(layer - 1, hidden, position_ids, state)
            if decider is not None and decider.evaluates(layer):
                decisions += 1
                decision = decider.decide(layer, hidden[:, -1, :], previous)
                if decision.stop:
                    state.complete_layers = layer
                    return LayerRun(hidden, position_ids, layer, decisions, decision.token)
            previous = hidden[:, -1, :]
        return LayerRun(hidden, position_ids, self.num_layers, decisions, None)

    def finish_layers(self, run: "LayerRun", state: DecodeState) -> np.ndarray:
        """Run the blocks an early exit skipped, so the KV cache is complete again; returns last logits."""
        hidden = run.hidden
        for layer in range(run.exit_layer + 1, self.num_layers + 1):
            hidden = self.block(layer - 1, hidden, run.position_ids, state)
        state.complete_layers = self.num_layers
        return self.final_logits(hidden[:, -1, :])

    def new_state(self, batch: int) -> DecodeState:
        m = self.manifest
        empty = np.zeros((batch, m.num_kv_heads, 0, m.head_dim), dtype=m.kv_dtype)  # int8 with `--kv int8`
        return DecodeState(keys=[empty] * m.num_layers, values=[empty] * m.num_layers,
                           attention_mask=np.zeros((batch, 0), dtype=np.int64),
                           next_position=np.zeros(batch, dtype=np.int64))

    def start(self, prompts: Sequence[Sequence[int]]) -> tuple[DecodeState, np.ndarray]:
        """Prefill a batch of token-id prompts (left-padded); returns the state and last logits."""
        prompts = [self.check_ids(p) for p in prompt_batch(prompts)]
        if not prompts:
            raise InputError("no prompts given")
        width = max(len(p) for p in prompts)
        check_memory(len(prompts), self.manifest.num_heads, width, width)
        input_ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = ids
            mask[row, width - len(ids):] = 1
        state = self.new_state(len(prompts))
        return state, self.forward(input_ids, state, mask)

    def step(self, state: DecodeState, next_ids: Sequence[int]) -> np.ndarray:
        """One decode step: one new token per row; returns the last logits."""
        checked = step_ids(next_ids)
        if len(checked) != state.attention_mask.shape[0]:
            raise InputError(f"step got {len(checked)} tokens for a batch of {state.attention_mask.shape[0]}")
        self._check_range(checked)
        ids = np.asarray(checked, dtype=np.int64).reshape(-1, 1)
        if state.complete_layers not in (None, self.num_layers):
            raise InputError("this state ended in an early exit; call finish_layers before decoding further")
        if state.length + 1 > self.manifest.max_positions:
            raise InputError(f"context would exceed the model's {self.manifest.max_positions} positions")
        return self.forward(ids, state, np.ones_like(ids))

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Last-position logits (batch, vocab) of a batch of token-id prompts."""
        return self.start(prompts)[1]

    # ------------------------------------------------------------------ text

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = token_ids(ids)
        if not ids:
            raise InputError("empty prompt")
        if len(ids) > self.manifest.max_positions:
            raise InputError(f"prompt has {len(ids)} tokens, more than the model's {self.manifest.max_positions} positions")
        self._check_range(ids)
        return ids

    def _check_range(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.manifest.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{self.manifest.vocab_size - 1})")

    def encode(self, prompt: Union[str, Sequence[int]]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("empty prompt")
            if self.tokenizer is None:
                raise BundleError("this bundle has no tokenizer.json; pass token ids instead of text")
            check_text(prompt)
            return self.check_ids(self.tokenizer.encode(prompt))
        return self.check_ids(prompt)

    def prepare_prompt(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 0,
                       truncate: Optional[str] = None) -> list[int]:
        """Token ids of a prompt with room for `max_new_tokens`: refused if too long, or with
        `truncate="left"` cut to its most recent tokens (a leading BOS token is kept)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("empty prompt")
            if self.tokenizer is None:
                raise BundleError("this bundle has no tokenizer.json; pass token ids instead of text")
            check_text(prompt)
            prompt = self.tokenizer.encode(prompt)
        ids = fit_prompt(token_ids(prompt), self.manifest.max_positions, max_new_tokens, truncate, self.manifest.bos_token_id)
        return self.check_ids(ids)

    def stream(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, seed: Optional[int] = None, stop_at_eos: bool = True,
               truncate: Optional[str] = None, mode: str = "full", max_draft: int = 4,
               stats: Optional[dict] = None, policy=None) -> Iterator[StreamEvent]:
        """Yield generated tokens one by one with their text increments (`truncate`: see `prepare_prompt`)."""
        check_options(max_new_tokens, temperature, top_p, seed)
        check_decoding(mode, max_draft)
        ids = self.prepare_prompt(prompt, max_new_tokens, truncate)
        self.check_request(len(ids), max_new_tokens, temperature, top_p, seed)
        rng = np.random.default_rng(seed)
        decoder = StreamDecoder(self.tokenizer, ids) if self.tokenizer is not None else None
        if decoder is not None:
            decoder.start()
        if max_new_tokens == 0:
            return
        from .decoding import Sampler, make_decoder

        decider = None
        if mode != "full":
            from .early_exit import ExitDecider

            decider = ExitDecider(self, policy) if policy is not None else self.decider()
        generator = make_decoder(self, mode, Sampler(temperature, top_p, rng), decider, max_draft)
        for index, emission in enumerate(generator.run(ids)):
            token = emission.token
            if stats is not None:
                for key, value in (("macs", emission.macs), ("decision_macs", emission.decision_macs),
                                   ("layers", emission.layers)):
                    stats[key] = stats.get(key, 0.0) + value
                stats["acceptance_rate"] = getattr(generator, "acceptance_rate", None)
                stats["rejected_rounds"] = getattr(generator, "rejected_rounds", None)
            yield StreamEvent(token=token, text=decoder.push(token) if decoder else "", layers=emission.layers)
            if (stop_at_eos and token in self.manifest.eos_token_ids) or index == max_new_tokens - 1:
                return

    def decider(self):
        """The bundle's calibrated exit decider (None if the bundle was never calibrated)."""
        if self._decider is None:
            from .early_exit import bundle_decider

            self._decider = bundle_decider(self)
        return self._decider

    @property
    def has_kv_fill(self) -> bool:
        return self.num_layers == 0 or "kv_fill_00" in self.sessions

    def kv_fill(self, layer: int, hidden: np.ndarray, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer`'s (1-based) keys and values for `hidden`, from its norm and K/V projections."""
        key, value = self._run(f"kv_fill_{layer - 1:02d}", hidden_states=hidden, position_ids=position_ids)
        return key, value

    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, stop_at_eos: bool = True,
                 truncate: Optional[str] = None, mode: str = "full", max_draft: int = 4, policy=None) -> Generation:
        """Generate a continuation; greedy by default (temperature 0); `truncate`: see `prepare_prompt`.
        `mode`: full, early-exit or speculative (see `runtime.decoding`); `policy` overrides the bundle's exit."""
        started = time.perf_counter()
        check_options(max_new_tokens, temperature, top_p, seed)
        ids = self.prepare_prompt(prompt, max_new_tokens, truncate)
        stats: dict = {}
        events = list(self.stream(ids, max_new_tokens, temperature, top_p, seed, stop_at_eos, mode=mode,
                                  max_draft=max_draft, stats=stats, policy=policy))
        tokens = [e.token for e in events]
        hit_eos = bool(tokens) and stop_at_eos and tokens[-1] in self.manifest.eos_token_ids
        text = self.tokenizer.decode(ids + tokens) if self.tokenizer is not None else ""
        count = max(1, len(tokens))
        return Generation(text=text, tokens=tokens, prompt_tokens=len(ids), new_tokens=len(tokens),
                          layers_per_token=[e.layers for e in events], seconds=time.perf_counter() - started,
                          stop_reason="eos" if hit_eos else "max_new_tokens", mode=mode,
                          macs_per_token=stats.get("macs", 0.0) / count,
                          decision_macs_per_token=stats.get("decision_macs", 0.0) / count,
                          acceptance_rate=stats.get("acceptance_rate"), rejected_rounds=stats.get("rejected_rounds"))

    def check_request(self, prompt_len: int, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                      seed: Optional[int] = None) -> None:
        """Refuse generation options the model cannot honour, before any work is done."""
        check_options(max_new_tokens, temperature, top_p, seed)
        if prompt_len + max_new_tokens > self.manifest.max_positions:
            raise InputError(f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds the model's "
                             f"{self.manifest.max_positions} positions")


def load(bundle_dir, providers: Sequence = DEFAULT_PROVIDERS, threads: Optional[int] = None,
         check_digests: bool = True) -> Model:
    """Load a bundle for inference with ONNX Runtime (CPU by default)."""
    check_threads(threads)
    return Model(open_bundle(bundle_dir, check_digests=check_digests), providers=providers, threads=threads)
