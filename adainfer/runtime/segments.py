"""Which graphs a pass through the blocks runs: spans of blocks where nothing needs to look between
them, single blocks elsewhere.

A bundle may hold span graphs (`span_FF_LL`: blocks FF..LL merged into one graph, the same
computation in one session call). A pass must stop at every *boundary*: after each layer where the
exit decider evaluates (and after the layer before it when the decision reads the previous hidden
state). Between boundaries `cover` takes the longest span that fits, else one block. The exporter
and calibration use `span_ranges` to decide which spans to write for a policy.
"""

from __future__ import annotations

from typing import Iterable

Segment = tuple[int, int]  # (first, last) block, 0-based, inclusive


def boundaries(num_layers: int, decider=None) -> frozenset[int]:
    """1-based layers after which a pass must surface its hidden state for `decider` (none without one)."""
    if decider is None:
        return frozenset()
    evaluated = [layer for layer in range(1, num_layers) if decider.evaluates(layer)]
    return _stops(evaluated, getattr(decider, "needs_previous", True))


def policy_stops(policy, num_layers: int) -> frozenset[int]:
    """`boundaries` of an `ExitPolicy` (what calibration writes spans for)."""
    return _stops(policy.evaluated_layers(num_layers), policy.reads_previous_hidden())


def _stops(evaluated: Iterable[int], previous: bool) -> frozenset[int]:
    """The evaluated layers, and the layer before each when the decision reads the previous hidden state."""
    evaluated = frozenset(evaluated)
    return evaluated | (frozenset(l - 1 for l in evaluated if l > 1) if previous else frozenset())


def cover(num_layers: int, stops: Iterable[int], spans: Iterable[Segment]) -> list[Segment]:
    """Segments covering blocks 0..num_layers-1 in order, none crossing a stop (1-based layer after
    which the pass surfaces), each the longest available span from where it starts, else one block."""
    stops = set(stops)
    longest: dict[int, list[int]] = {}
    for first, last in spans:
        longest.setdefault(first, []).append(last)
    segments = []
    first = 0
    while first < num_layers:
        end = first  # the longest span from `first` that does not run past a stop
        for last in sorted(longest.get(first, ()), reverse=True):
            if last < num_layers and not any(first + 1 <= stop <= last for stop in stops):
                end = last
                break
        segments.append((first, end))
        first = end + 1
    return segments


def span_ranges(num_layers: int, stops: Iterable[int]) -> list[Segment]:
    """The spans worth writing for a pass that surfaces after `stops`: every run of two or more blocks between them."""
    cuts = sorted({s for s in stops if 0 < s < num_layers} | {num_layers})
    ranges, first = [], 0
    for cut in cuts:
        if cut - first >= 2:
            ranges.append((first, cut - 1))
        first = cut
    return ranges
