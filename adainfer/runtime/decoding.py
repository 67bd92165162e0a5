"""Token-by-token generation in three modes, each yielding what every token cost.

- full: every token runs every block.
- early-exit: a token stops where the calibrated classifier fires; the layers it skipped
  get its keys and values from the exit hidden state through their own norm and K/V
  projections (`kv_fill_NN` graphs: CALM's state propagation). Approximate.
- speculative: draft tokens with early exit (+ propagation, in a throw-away copy of the
  cache), verify them with one full-depth forward over all of them, keep the longest prefix
  the full model agrees with, and roll the cache back past the first rejected token.
  Lossless: greedy output equals full-depth greedy output; with sampling the standard
  speculative acceptance rule keeps the full model's distribution.
The prompt always runs at full depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..accounting import TokenCost, fill_macs, token_cost
from ..errors import BundleError
from . import chain
from .exit_policy import ExitPolicy
from .sampling import choose_token, distribution

MODES = ("full", "early-exit", "speculative")


@dataclass
class Emission:
    """One generated token and the compute charged to it."""

    token: int
    layers: float  # blocks run for this token (a speculative round's blocks are shared by its tokens)
    macs: float
    decision_macs: float
    drafted: bool = False


@dataclass
class Sampler:
    temperature: float
    top_p: float
    rng: np.random.Generator

    def choose(self, logits: np.ndarray) -> int:
        return choose_token(logits, self.temperature, self.top_p, self.rng)

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        return distribution(logits, self.temperature, self.top_p)


class FullDecoder:
    def __init__(self, model, sampler: Sampler):
        self.model, self.sampler = model, sampler
        self.never = ExitPolicy.never()

    def run(self, ids: Sequence[int]) -> Iterator[Emission]:
        model = self.model
        state, logits = model.start([ids])
        try:
            while True:
                token = self.sampler.choose(logits[0])
                cost = token_cost(model.manifest, self.never, model.num_layers, state.length)
                yield Emission(token, model.num_layers, cost.total, 0)
                logits = model.step(state, [token])
        finally:
            state.close()


class EarlyExitDecoder:
    """Each generated token stops where the decider fires; skipped layers are filled by propagation."""

    def __init__(self, model, sampler: Sampler, decider):
        self.model, self.sampler, self.decider = model, sampler, decider

    def run(self, ids: Sequence[int]) -> Iterator[Emission]:
        model = self.model
        state, logits = model.start([ids])
        cost = token_cost(model.manifest, ExitPolicy.never(), model.num_layers, state.length)
        layers = model.num_layers
        decision = 0
        try:
            while True:
                token = self.sampler.choose(logits[0])
                yield Emission(token, layers, cost.total, decision)
                logits, layers, cost = self.step(state, token)
                decision = cost.decisions
        finally:
            state.close()

    def step(self, state, token: int):
        model, backend = self.model, self.model.backend
        ids = np.array([[token]], dtype=np.int64)
        run = chain.run_layers(backend, ids, state, None, self.decider)
        chain.fill_skipped(backend, state, run)
        logits = chain.last_logits(backend, run)  # the head runs once more: charged below
        cost = token_cost(model.manifest, self.decider.policy, run.exit_layer, state.length)
        cost = TokenCost(cost.blocks, cost.decisions, model.manifest.macs.final_head, fill_macs(model.manifest, run.exit_layer))
        return logits, run.exit_layer, cost


class SpeculativeDecoder:
    """Draft with early exit, verify at full depth, keep the agreeing prefix, roll back the rest.

    Adaptive: a round that gains nothing (its first draft rejected, or no draft at all because the
    exit never fired, which still paid every decision) makes the decoder take plain full-depth
    steps for a while, four times as long after each such round in a row (4, 16, 64, up to
    `MAX_BACKOFF`), and halves the next round's draft length (which starts at 1); a round whose drafts were all
    accepted divides the pause by four and doubles the draft length (up to `max_draft`). Drafting
    that keeps failing thus costs a vanishing share of the steps instead of making every step
    slower than full depth."""

    MAX_BACKOFF = 64

    def __init__(self, model, sampler: Sampler, decider, max_draft: int = 4, adaptive: bool = True):
        self.model, self.sampler, self.decider, self.max_draft = model, sampler, decider, max_draft
        self.drafter = EarlyExitDecoder(model, sampler, decider)
        self.state = None
        self.drafted = self.accepted = self.rejected_rounds = self.rounds = 0
        self.adaptive = adaptive
        self.backoff = 0  # length of the next pause in drafting, in tokens
        self.draft_length = 1 if adaptive else max_draft  # slow start: drafts lengthen as they are accepted
        self.paused = 0  # full-depth steps left before drafting again
        self.plain_steps = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def draft(self, token: int):
        """Up to max_draft tokens from early exits, in a copy of the cache; stops at a token that ran full depth.

        If the very first draft step runs full depth, nothing in it was approximate: its cache and
        logits are the full model's, returned as `exact` = (state, logits) so no verification is needed."""
        state = self.state.fork()
        tokens, dists, macs, decisions, layers = [], [], 0.0, 0.0, 0
        exact = None
        for _ in range(self.draft_length):
            logits, exit_layer, cost = self.drafter.step(state, token)
            macs += cost.total
            decisions += cost.decisions
            layers += exit_layer
            if exit_layer == self.model.num_layers:
                if not tokens:
                    exact = (state, logits)
                break  # the classifier was not confident: stop drafting
            dists.append(self.sampler.distribution(logits[0]))
            token = self._sample(dists[-1], logits[0])
            tokens.append(token)
        if exact is None:
            state.close()  # the drafts' cache: verification runs on the verified one
        return tokens, dists, macs, decisions, layers, exact

    def _sample(self, probs: np.ndarray, logits: np.ndarray) -> int:
        if self.sampler.temperature <= 0:
            return int(np.argmax(logits))
        return int(self.sampler.rng.choice(probs.shape[0], p=probs))

    def verify(self, token: int, drafts: list[int]) -> np.ndarray:
        """One full-depth forward over [token] + drafts on the verified cache; logits at every position."""
        ids = np.array([[token, *drafts]], dtype=np.int64)
        backend = self.model.backend
        return chain.all_logits(backend, chain.run_layers(backend, ids, self.state))

    def accept(self, drafts: list[int], dists: list[np.ndarray], logits: np.ndarray) -> tuple[int, int]:
        """(number of drafts accepted, the next token from the full model)."""
        rng = self.sampler.rng
        for i, d in enumerate(drafts):
            if self.sampler.temperature <= 0:
                target = int(np.argmax(logits[i]))
                if d != target:
                    return i, target
                continue
            p, q = self.sampler.distribution(logits[i]), dists[i]
            if rng.random() < min(1.0, p[d] / q[d]):
                continue
            residual = np.maximum(p - q, 0.0)
            residual = residual / residual.sum() if residual.sum() > 0 else p
            return i, int(rng.choice(residual.shape[0], p=residual))
        return len(drafts), self.sampler.choose(logits[len(drafts)])

    def run(self, ids: Sequence[int]) -> Iterator[Emission]:
        self.state, logits = self.model.start([ids])
        try:
            yield from self._rounds(logits)
        finally:
            self.state.close()

    def _rounds(self, logits: np.ndarray) -> Iterator[Emission]:
        model = self.model
        token = self.sampler.choose(logits[0])
        yield Emission(token, model.num_layers, token_cost(model.manifest, ExitPolicy.never(), model.num_layers,
                                                           self.state.length).total, 0)
        while True:
            if self.paused > 0:  # drafting has not been paying: plain full-depth steps
                self.paused -= 1
                self.plain_steps += 1
                logits = model.step(self.state, [token])
                token = self.sampler.choose(logits[0])
                yield Emission(token, model.num_layers, token_cost(model.manifest, ExitPolicy.never(), model.num_layers,
                                                                   self.state.length).total, 0)
                continue
            drafts, dists, macs, decisions, layers, exact = self.draft(token)
            if exact is not None:  # a plain full-depth step: adopt it
                self.state.close()
                self.state, logits = exact
                token = self.sampler.choose(logits[0])
                self._adapt(gained=False)
                yield Emission(token, layers, macs, decisions)
                continue
            logits = self.verify(token, drafts)
            verified_length = self.state.length
            accepted, next_token = self.accept(drafts, dists, logits)
            self.rounds += 1
            self.drafted += len(drafts)
            self.accepted += accepted
            if accepted < len(drafts):
                self.rejected_rounds += 1
            if accepted == 0 or accepted == len(drafts):
                self._adapt(gained=accepted > 0)
            self.state.truncate(verified_length - (len(drafts) - accepted))  # drop rejected drafts' entries
            context = verified_length
            verify_macs = sum(token_cost(model.manifest, ExitPolicy.never(), model.num_layers, context - j).total
                              for j in range(len(drafts) + 1))
            out = [*drafts[:accepted], next_token]
            share = (macs + verify_macs) / len(out)
            per_layers = (layers + model.num_layers * (len(drafts) + 1)) / len(out)
            for i, t in enumerate(out):
                yield Emission(t, per_layers, share, decisions / len(out), drafted=i < accepted)
            token = next_token


    def _adapt(self, gained: bool) -> None:
        if not self.adaptive:
            return
        if gained:
            self.backoff //= 4
            self.draft_length = min(self.max_draft, 2 * self.draft_length)
        else:
            self.backoff = min(self.MAX_BACKOFF, max(4, 4 * self.backoff))
            self.paused = self.backoff
            self.draft_length = max(1, self.draft_length // 2)


def make_decoder(model, mode: str, sampler: Sampler, decider=None, max_draft: int = 4):
    if mode == "full":
        return FullDecoder(model, sampler)
    if decider is None:
        raise BundleError("this bundle has no exit policy: run `adainfer calib BUNDLE` first")
    if mode == "early-exit":
        return EarlyExitDecoder(model, sampler, decider)
    if mode == "speculative":
        return SpeculativeDecoder(model, sampler, decider, max_draft)
    raise BundleError(f"unknown mode {mode!r}; choose {', '.join(MODES)}")
