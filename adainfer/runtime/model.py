"""A loaded bundle: tokenizer, limits and generation, over one backend (`backend.py`) that runs its graphs.

`Model` is a facade: it holds a backend (cpu, cpu-iobinding, ort-cuda, ort-trt or tensorrt) and is
never subclassed; the block loop is `chain.run_layers`, the decoding modes are `decoding.py`.
Batches are left-padded: every row's last position is the newest token, and position ids count
real tokens only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import BundleError, InputError
from . import chain
from .backend import KVState, LayerRun
from .bundle import Bundle
from .decoding import Sampler, make_decoder
from .early_exit import load_policy
from .limits import (check_decoding, check_memory, check_options, check_text, fit_prompt,
                     prompt_batch, step_ids, token_ids)
from .tokenizer import StreamDecoder, TextTokenizer

DecodeState = KVState  # what `start` returns and `step` takes: the backend's KV cache


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


class Model:
    """A loaded bundle on one backend. Thread-safe for concurrent generations on the cpu backends:
    each owns its KV cache (the tensorrt backend runs one generation at a time)."""

    def __init__(self, bundle: Bundle, backend):
        self.bundle, self.backend = bundle, backend
        self.manifest = bundle.manifest
        tok = bundle.tokenizer_path
        self.tokenizer = TextTokenizer(tok) if tok is not None else None
        self.num_layers = self.manifest.num_layers
        self._decider = None  # the calibrated exit decider, made on first early-exit use

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def sessions(self):
        """The ONNX Runtime sessions of the ONNX Runtime backends (by graph name)."""
        return self.backend.sessions

    @property
    def session_calls(self) -> dict:
        """Graph name -> number of calls so far (assign a dict to reset)."""
        return self.backend.calls

    @session_calls.setter
    def session_calls(self, value: dict) -> None:
        self.backend.calls = value

    def close(self) -> None:
        """Release the backend's sessions and device memory now (a Jetson shares its RAM with the GPU)."""
        self.backend.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ graphs, one call each

    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self.backend.host(self.backend.embed(input_ids, position_ids, None))

    def block(self, layer: int, hidden: np.ndarray, position_ids: np.ndarray, state: DecodeState) -> np.ndarray:
        """Run decoder block `layer` (0-based) and append this step's keys and values to the state."""
        return self.backend.host(self.backend.block(layer, hidden, position_ids, state))

    def final_logits(self, hidden_last: np.ndarray) -> np.ndarray:
        return self.backend.logits(hidden_last)

    def exit_features(self, hidden_last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top-1 id, top-1 prob, gap) of the distribution the LM head gives this hidden state."""
        return self.backend.exit_outputs(hidden_last)

    def kv_fill(self, layer: int, hidden: np.ndarray, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer`'s (1-based) keys and values for `hidden`, from its norm and K/V projections."""
        return self.backend.kv_fill_outputs(layer - 1, hidden, position_ids)

    @property
    def has_kv_fill(self) -> bool:
        return self.backend.has_kv_fill

    # ------------------------------------------------------------------ forward

    def new_state(self, batch: int) -> DecodeState:
        return self.backend.new_cache(batch)

    def run_layers(self, input_ids: np.ndarray, state: DecodeState, step_mask: Optional[np.ndarray] = None,
                   decider=None) -> LayerRun:
        """`chain.run_layers` on this model's backend (`step_mask`: None where every new token is real), with the
        hidden states returned on the host."""
        run = chain.run_layers(self.backend, input_ids, state, step_mask, decider)
        return replace(run, hidden=self.backend.host(run.hidden))

    def forward(self, input_ids: np.ndarray, state: DecodeState, step_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Feed `input_ids` (batch, seq) through every block (`step_mask`: None where every new token is real);
        returns the last position's logits."""
        return chain.full_depth_logits(self.backend, input_ids, state, step_mask)

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
        if state.complete_layers not in (None, self.num_layers):
            raise InputError("this state ended in an early exit; fill the skipped layers "
                             "(chain.fill_skipped) before decoding further")
        if state.length + 1 > self.manifest.max_positions:
            raise InputError(f"context would exceed the model's {self.manifest.max_positions} positions")
        return self.forward(np.array([[i] for i in checked], dtype=np.int64), state)

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Last-position logits (batch, vocab) of a batch of token-id prompts."""
        state, logits = self.start(prompts)
        state.close()
        return logits

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
        if mode == "speculative" and not getattr(self.backend, "multi_token_steps", True):
            raise InputError(f"the {self.backend.name} backend cannot run several tokens on a filled cache, which "
                             f"speculative decoding verifies with; use --mode full or early-exit")
        decider = None
        if mode != "full":
            decider = self.backend.make_decider(self, policy) if policy is not None else self.decider()
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
            policy = load_policy(self)
            self._decider = self.backend.make_decider(self, policy) if policy is not None else None
        return self._decider

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
