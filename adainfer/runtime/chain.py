"""The chain: embedding -> block 1 ... block L, stopping where an exit decider says. The only loop
over a bundle's layers in the runtime, for every backend (`backend.py`).

Batches are left-padded: every row's last position is the newest token, and position ids count
real tokens only (`KVState.advance`).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..errors import BundleError
from .backend import Backend, KVCache, LayerRun
from .segments import boundaries, cover

Observer = Callable[[int, object], None]


def run_layers(backend: Backend, input_ids: np.ndarray, cache: KVCache, step_mask: Optional[np.ndarray] = None,
               decider=None, observe: Optional[Observer] = None) -> LayerRun:
    """Embed `input_ids` (batch, seq) and run the blocks in order, appending to `cache` (`step_mask`: which of the
    new positions are real, None for all, `KVState.advance`); with a
    `decider` stop after the first evaluated block where it says so. `observe(layer, hidden)` sees
    the embedding (layer 0) and every block's output (calibration traces).

    The blocks run as segments (`segments.cover`): spans of blocks the backend can run as one graph
    (`backend.spans`) between the layers where the decider looks, single blocks elsewhere; with
    `observe`, or where a row is padded, single blocks only (a span's attention rotates keys by cache slot,
    which is the position only without padding: `exporter/rotary_fold.py`)."""
    position_ids = cache.advance(step_mask, input_ids.shape[1])
    hidden = backend.embed(input_ids, position_ids, cache)
    if observe is not None:
        observe(0, hidden)
    L = backend.num_layers
    spans = () if observe is not None or not cache.unpadded else getattr(backend, "spans", ())
    decisions = 0
    for first, last in cover(L, boundaries(L, decider), spans):
        before = hidden
        hidden = backend.segment(first, last, hidden, position_ids, cache)
        layer = last + 1
        if observe is not None:
            observe(layer, hidden)
        if decider is not None and decider.evaluates(layer):
            decisions += 1
            # `before`: the previous layer's output where the decider reads it (then `layer - 1` is a boundary)
            decision = backend.decide(decider, layer, hidden, before)
            if decision.stop:
                if layer < L:
                    cache.complete_layers = layer
                return LayerRun(hidden, position_ids, layer, decisions, decision.token)
    return LayerRun(hidden, position_ids, L, decisions, None)


def fill_skipped(backend: Backend, cache: KVCache, run: LayerRun) -> None:
    """Give the layers after `run.exit_layer` this step's keys and values, from the exit hidden
    state through each skipped layer's own norm and K/V projections (`kv_fill_NN`: CALM's state
    propagation), so the next step can run at any depth."""
    if run.exit_layer >= backend.num_layers:
        return
    if not backend.has_kv_fill:
        raise BundleError("this bundle has no kv_fill graphs (re-export it to generate with early exit)")
    # 0-based: the skipped blocks, in one call where the backend has them merged (`kv_fill_span`)
    fill_span = getattr(backend, "kv_fill_span", None)
    if fill_span is None or not fill_span(run.exit_layer, backend.num_layers - 1, run.hidden, run.position_ids, cache):
        for layer in range(run.exit_layer, backend.num_layers):
            backend.kv_fill(layer, run.hidden, run.position_ids, cache)
    cache.complete_layers = backend.num_layers


def full_depth_logits(backend: Backend, input_ids: np.ndarray, cache: KVCache,
                      step_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Every block, then the last position's logits (batch, vocab): in one graph call where the backend runs
    a full step (embedding, blocks and final head merged) and no row is padded (the full step's attention rotates
    keys by cache slot, the blocks' by position: equal without padding), else `run_layers` and the final head."""
    if getattr(backend, "runs_full_step", False) and cache.unpadded and (step_mask is None or step_mask.all()):
        return backend.full_step(input_ids, cache.advance(step_mask, input_ids.shape[1]), cache)
    return last_logits(backend, run_layers(backend, input_ids, cache, step_mask))


def last_logits(backend: Backend, run: LayerRun) -> np.ndarray:
    """Logits (batch, vocab) at the last position of every row, where `run` ended."""
    return backend.logits(backend.rows(run.hidden, "last"))


def all_logits(backend: Backend, run: LayerRun) -> np.ndarray:
    """Logits (seq, vocab) at every position of a batch of one."""
    return backend.logits(backend.rows(run.hidden, "all"))
