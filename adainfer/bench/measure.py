"""Interleaved timings: every repeat runs every contender once, in a rotated order, after warm-up runs.

Per contender and repeat: prefill latency of each prompt length (prompt -> first token) and the
mean time per token of greedy decode steps after the shortest prompt. `run` drives objects with
`time_prefill(ids)` / `time_decode(ids, tokens)` (`remote.Remote`: the timing happens inside the
contender's own process, so the pipe between them is not timed); `time_prefill` / `time_decode`
below are what a worker runs on its contender.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Callable, Optional


def time_prefill(contender, ids) -> float:
    started = time.perf_counter()
    contender.prefill(ids)
    return time.perf_counter() - started


def time_decode(contender, ids, tokens: int) -> float:
    if hasattr(contender, "decode"):  # a contender that can only be timed whole (prompt included)
        started = time.perf_counter()
        contender.decode(ids, tokens)
        return (time.perf_counter() - started) / tokens
    state, token = contender.prefill(ids)
    started = time.perf_counter()
    for _ in range(tokens):
        token = contender.step(state, token)
    return (time.perf_counter() - started) / tokens


def run(contenders: list, prompts: dict[int, list[int]], decode_tokens: int, repeats: int, warmup: int = 1,
        log: Optional[Callable[[str], None]] = None, failures: Optional[dict] = None) -> dict[str, dict[str, list[float]]]:
    """Raw seconds: {contender: {"prefill_<n>": [...], "decode": [...]}}, one value per repeat.

    A contender that raises (a peer's runtime refusing this model, say) is dropped from the run and its
    error recorded in `failures` (name -> message); the others go on."""
    shortest = prompts[min(prompts)]
    samples = {c.name: {**{f"prefill_{n}": [] for n in prompts}, "decode": []} for c in contenders}
    alive = list(contenders)
    failures = failures if failures is not None else {}

    def attempt(c, work) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - reported as the contender's row
            failures[c.name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            samples.pop(c.name, None)
            alive.remove(c)
            if log:
                log(f"{c.name} dropped: {failures[c.name]}")

    def warm(c) -> None:
        for ids in prompts.values():
            c.time_prefill(ids)
        c.time_decode(shortest, min(decode_tokens, 8))

    def timed(c) -> None:
        values = {f"prefill_{n}": c.time_prefill(ids) for n, ids in prompts.items()}
        values["decode"] = c.time_decode(shortest, decode_tokens)
        for key, value in values.items():
            samples[c.name][key].append(value)

    for _ in range(warmup):
        for c in list(alive):
            attempt(c, lambda c=c: warm(c))
    for r in range(repeats):
        order = list(alive)
        shift = r % len(order) if order else 0
        for c in order[shift:] + order[:shift]:
            attempt(c, lambda c=c: timed(c))
        if log:
            log(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{c.name} {samples[c.name]['decode'][-1] * 1e3:.2f} ms/token" for c in alive))
    return samples


def stats(values: list[float]) -> dict:
    """median, min, max, first and third quartile (exclusive method; all equal the value for one sample)."""
    v = sorted(values)

    def quantile(q: float) -> float:
        pos = q * (len(v) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return {"median": median(v), "min": v[0], "max": v[-1], "q1": quantile(0.25), "q3": quantile(0.75), "n": len(v)}


def paired_ratio(a: list[float], b: list[float]) -> dict:
    """Median (and min/max) of per-repeat ratios a/b: pairs measured back to back cancel slow drifts of load."""
    ratios = [x / y for x, y in zip(a, b)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}
