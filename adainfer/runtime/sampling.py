"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    p = np.exp(z)
    return p / p.sum()


def distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The distribution sampling draws from: tempered softmax, truncated to the top-p nucleus.
    Greedy decoding (temperature 0) is the one-hot distribution of the argmax."""
    if temperature <= 0.0:
        probs = np.zeros(logits.shape[-1])
        probs[int(np.argmax(logits))] = 1.0
        return probs
    # shift before dividing: a tiny temperature (1e-38) must not turn float32 logits into inf - inf
    probs = softmax((logits.astype(np.float64) - np.max(logits)) / temperature)
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        keep = (np.cumsum(sorted_probs) - sorted_probs) < top_p
        truncated = np.zeros_like(probs)
        truncated[order[keep]] = sorted_probs[keep]
        probs = truncated / truncated.sum()
    return probs


def choose_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0; otherwise sample from the tempered, top-p-truncated distribution."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    probs = distribution(logits, temperature, top_p)
    return int(rng.choice(probs.shape[0], p=probs))
