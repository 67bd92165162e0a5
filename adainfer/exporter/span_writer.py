"""Span graphs in a bundle: written, checked against the chained blocks, listed in the manifest.

Every export writes the full-depth span `span_00_LL` (all blocks as one graph) and the full step
(`full_step`: embedding, that span and the final head as one graph, a full-depth token in one
session call), and calibration adds the spans between the layers its policy evaluates
(`segments.span_ranges`). The merged graphs reference the weights of the graphs they merge: at
export every weight two graphs hold is moved into the bundle's shared weight file
(`shared_weights.share_weights`, via `reshare`), so they add no weight bytes on disk, and spans
added later point into that file too. The full step is checked against embed -> span -> head. A span is checked against its blocks run one after
another on random inputs (hidden state and every layer's keys and values within `TOLERANCE`). Where
spans cannot be made (block graphs holding subgraphs) the bundle has none: the runtime runs blocks.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import onnx

from ..errors import ExportError
from ..manifest import GraphSpec, Manifest, file_spec
from ..runtime.segments import Segment
from ..runtime.sessions import make_session
from .q4_1_twins import add_q4_1_twins
from .shared_weights import share_weights
from .spans import FULL_STEP, fill_name, merge_blocks, merge_fills, merge_full_step, span_name

#: largest difference allowed between a span's outputs and its chained blocks' (they run the same kernels)
TOLERANCE = 1e-5
#: largest difference allowed between the full step's logits and embed -> span -> head run one after another
#: (ONNX Runtime may fuse across what were graph boundaries: float32 rounding, logits of magnitude ~10)
LOGITS_TOLERANCE = 1e-4


def without_spans(manifest: Manifest) -> Manifest:
    """A copy of `manifest` listing no span graphs and no full step (their files are not touched)."""
    names = manifest.merged_graphs
    return dataclasses.replace(manifest, graphs={k: v for k, v in manifest.graphs.items() if k not in names})


def mergeable(bundle_dir: Path, manifest: Manifest) -> bool:
    """Whether the block graphs are flat (no node holds a subgraph): only those merge into spans."""
    for name in manifest.block_names:
        model = onnx.load(str(Path(bundle_dir) / manifest.graphs[name].file), load_external_data=False)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
            return False
    return True


def add_full_span(bundle_dir: Path, manifest: Manifest, threshold: int, check: bool = True) -> Manifest:
    """Write the full-depth span and the full step into the bundle being exported in `bundle_dir`, move every
    weight two graphs hold into the shared weight file, list both in the manifest (saved); a bundle whose
    blocks cannot be merged keeps neither."""
    L = manifest.num_layers
    if L < 2 or not mergeable(bundle_dir, manifest):
        return manifest
    manifest = add_spans(bundle_dir, manifest, [(0, L - 1)], check=False, twins=False)  # written after `reshare`
    manifest = add_full_step(bundle_dir, manifest, check=False)
    manifest = reshare(bundle_dir, manifest, threshold)
    manifest = add_q4_1_twins(bundle_dir, manifest)
    if check:
        check_span(bundle_dir, bundle_dir, manifest, 0, L - 1)
        check_full_step(bundle_dir, manifest)
    return manifest


def add_full_step(bundle_dir: Path, manifest: Manifest, check: bool = True) -> Manifest:
    """Write `full_step.onnx` (embed -> the full-depth span -> final head at the last position, one graph: a
    full-depth step in one session call), list it first in the manifest (saved) and check it against the three
    graphs run one after another. It references the weights those graphs keep in files; weights they hold
    inline are copied into it until `reshare` moves them into the shared file."""
    L = manifest.num_layers
    span = manifest.spans.get((0, L - 1))
    if span is None or FULL_STEP in manifest.graphs:
        return manifest
    g = manifest.graphs
    merge_full_step(bundle_dir, g["embed"].file, g[span].file, g["final_head"].file, f"{FULL_STEP}.onnx")
    spec = dataclasses.replace(graph_spec(bundle_dir, f"{FULL_STEP}.onnx"), precision=g[span].precision)
    manifest = dataclasses.replace(manifest, graphs={FULL_STEP: spec, **g})  # first: see `reshare`
    manifest.save(bundle_dir)
    if check:
        check_full_step(bundle_dir, manifest)
    return manifest


def reshare(bundle_dir: Path, manifest: Manifest, threshold: int) -> Manifest:
    """Move every weight two or more graphs hold into the shared weight file, rewriting the graphs (only while
    exporting: it changes their digests); the manifest with their new specs (saved). Graphs are read in manifest
    order, the merged ones first: they reference the blocks' own data files, which rewriting a block removes."""
    files = dict(manifest.files)
    shared = share_weights(bundle_dir, [spec.file for spec in manifest.graphs.values()], threshold)
    if shared:
        files["shared_weights"] = file_spec(bundle_dir, shared)
    graphs = {k: dataclasses.replace(graph_spec(bundle_dir, spec.file), precision=spec.precision)
              for k, spec in manifest.graphs.items()}
    manifest = dataclasses.replace(manifest, graphs=graphs, files=files)
    manifest.save(bundle_dir)
    return manifest


def add_spans(bundle_dir: Path, manifest: Manifest, ranges: Iterable[Segment], *, fills: Iterable[Segment] = (),
              check: bool = True, out_dir: Optional[Path] = None, twins: bool = True) -> Manifest:
    """Write a span graph for every (first, last) of `ranges` and a merged kv_fill graph for every (first, last) of
    `fills` the bundle lacks; returns the manifest listing them (saved into `out_dir`, default `bundle_dir`). They
    point into the files the blocks and kv fills read and keep their small inline tensors (while exporting,
    `reshare` then moves what they share into the shared file). `twins`: also write their fused Q4_1 twins
    (`q4_1_twins.py`; not when `reshare` follows, which rewrites the graphs)."""
    bundle_dir = Path(bundle_dir)
    out_dir = Path(out_dir) if out_dir is not None else bundle_dir
    ranges = [r for r in dict.fromkeys(ranges) if r not in manifest.spans and r[1] > r[0]]
    fills = [r for r in dict.fromkeys(fills) if r not in manifest.fill_spans and r[1] > r[0]
             and all(f"kv_fill_{i:02d}" in manifest.graphs for i in range(r[0], r[1] + 1))]
    if not ranges and not fills:
        return manifest
    precision = manifest.graphs[manifest.block_name(0)].precision
    if out_dir != bundle_dir:  # a staged update: the data files the spans will read, linked beside them
        for data in [f.file for f in manifest.files.values()] + [d.file for g in manifest.graphs.values() for d in g.data_files]:
            if not (out_dir / data).exists() and (bundle_dir / data).is_file():
                os.link(bundle_dir / data, out_dir / data)
    # new spans listed first: sharing reads the graphs in this order, and a span reads the blocks' own data files,
    # which rewriting a block removes (so a second `share_weights` in manifest order changes nothing)
    graphs: dict = {span_name(first, last): None for first, last in ranges}
    graphs.update({fill_name(first, last): None for first, last in fills})
    graphs.update(manifest.graphs)
    for first, last in ranges:
        name = span_name(first, last)
        files = [manifest.graphs[manifest.block_name(i)].file for i in range(first, last + 1)]
        merge_blocks(bundle_dir, files, first, f"{name}.onnx", out_dir=out_dir)
    for first, last in fills:
        name = fill_name(first, last)
        files = [manifest.graphs[f"kv_fill_{i:02d}"].file for i in range(first, last + 1)]
        merge_fills(bundle_dir, files, first, f"{name}.onnx", out_dir=out_dir)
    graphs = {k: spec if spec is not None else dataclasses.replace(graph_spec(out_dir, f"{k}.onnx"), precision=precision)
              for k, spec in graphs.items()}
    manifest = dataclasses.replace(manifest, graphs=graphs)
    manifest.save(out_dir)
    if twins:
        manifest = add_q4_1_twins(out_dir, manifest, [span_name(*r) for r in ranges] + [fill_name(*r) for r in fills])
    if check:
        for first, last in ranges:
            check_span(bundle_dir, out_dir, manifest, first, last)
        check_fill_spans(bundle_dir, out_dir, manifest, fills)
    return manifest


def exit_fills(num_layers: int, exits: Iterable[int]) -> list[Segment]:
    """The kv fills an exit after each of `exits` blocks runs: layers exit..L-1 (0-based), where two or more."""
    return [(k, num_layers - 1) for k in sorted(set(exits)) if 0 < k < num_layers - 1]


def graph_spec(root: Path, file: str) -> GraphSpec:
    from .writer import _graph_spec

    return _graph_spec(Path(root) / file)


def check_span(bundle_dir: Path, out_dir: Path, manifest: Manifest, first: int, last: int) -> float:
    """Run span `first..last` and its blocks one after another on random inputs (a 3-token prefill on a
    2-token cache); refuse the export where any output differs by more than `TOLERANCE`. Returns the difference."""
    rng = np.random.default_rng(first * 1000 + last)
    m = manifest
    kv = np.dtype(m.kv_dtype)
    hidden = rng.standard_normal((1, 3, m.hidden_size)).astype(np.float32)
    feeds = {"hidden_states": hidden, "position_ids": np.arange(2, 5, dtype=np.int64)[None],
             "attention_mask": np.ones((1, 5), dtype=np.int64)}
    past = {i: [_kv(rng, (1, m.num_kv_heads, 2, m.head_dim), kv) for _ in range(2)] for i in range(first, last + 1)}
    chained = {}
    h = hidden
    for i in range(first, last + 1):
        session = make_session(bundle_dir / m.graphs[m.block_name(i)].file, threads=1)
        out = _outputs(session, {**feeds, "hidden_states": h, "past_key": past[i][0], "past_value": past[i][1]})
        h = out["hidden_states_out"]
        chained[f"present_key_{i:02d}"], chained[f"present_value_{i:02d}"] = out["present_key"], out["present_value"]
    chained["hidden_states_out"] = h
    name = span_name(first, last)
    session = make_session(out_dir / m.graphs[name].file, threads=1)
    span_feeds = dict(feeds)
    for i in range(first, last + 1):
        span_feeds[f"past_key_{i:02d}"], span_feeds[f"past_value_{i:02d}"] = past[i]
    got = _outputs(session, span_feeds)
    worst = max(float(np.max(np.abs(got[k].astype(np.float64) - v.astype(np.float64)))) for k, v in chained.items())
    if not worst <= TOLERANCE:
        raise ExportError(f"{name} differs from its blocks run one after another by {worst:.3g} (allowed {TOLERANCE})")
    return worst


def check_fill_spans(bundle_dir: Path, out_dir: Path, manifest: Manifest, fills: Iterable[Segment]) -> float:
    """Run every merged kv fill of `fills` and each layer's kv_fill graph (once, shared by the fills) on one random
    hidden state of 3 positions; refuse the export where any key or value differs by more than `TOLERANCE`.
    Returns the largest difference."""
    rng = np.random.default_rng(7)
    m = manifest
    feeds = {"hidden_states": rng.standard_normal((1, 3, m.hidden_size)).astype(np.float32),
             "position_ids": np.arange(2, 5, dtype=np.int64)[None]}
    layers: dict[int, dict] = {}
    worst = 0.0
    for first, last in fills:
        name = fill_name(first, last)
        got = _outputs(make_session(out_dir / m.graphs[name].file, threads=1), feeds)
        diff = 0.0
        for i in range(first, last + 1):
            if i not in layers:
                layers[i] = _outputs(make_session(bundle_dir / m.graphs[f"kv_fill_{i:02d}"].file, threads=1), feeds)
            for kv in ("key", "value"):
                diff = max(diff, float(np.max(np.abs(got[f"{kv}_{i:02d}"].astype(np.float64)
                                                     - layers[i][kv].astype(np.float64)))))
        if not diff <= TOLERANCE:
            raise ExportError(f"{name} differs from its layers' kv_fill graphs by {diff:.3g} (allowed {TOLERANCE})")
        worst = max(worst, diff)
    return worst


def check_full_step(bundle_dir: Path, manifest: Manifest) -> float:
    """Run the full step and embed -> span -> head on random token ids: a decode step of a batch of 2 on a
    3-token cache, and 3 new tokens of one row on a 2-token cache (ONNX Runtime's fused attention takes several
    new tokens on a cache for one row only; the full step must read each row's last one). Refuse the export
    where logits differ by more than `LOGITS_TOLERANCE` or a cache entry by more than `TOLERANCE`. Returns
    the largest logit difference."""
    m = manifest
    L = m.num_layers
    rng = np.random.default_rng(L)
    kv = np.dtype(m.kv_dtype)

    sessions: dict = {}

    def run(graph: str, feeds: dict) -> dict:
        if graph not in sessions:  # one session per graph for both cases (the span and full step are large)
            sessions[graph] = make_session(Path(bundle_dir) / m.graphs[graph].file, threads=1)
        return _outputs(sessions[graph], feeds)

    worst = cache = 0.0
    for batch, new, past in ((2, 1, 3), (1, 3, 2)):
        ids = rng.integers(0, m.vocab_size, (batch, new)).astype(np.int64)
        feeds = {"position_ids": np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1)),
                 "attention_mask": np.ones((batch, past + new), dtype=np.int64)}
        for i in range(L):
            feeds[f"past_key_{i:02d}"], feeds[f"past_value_{i:02d}"] = (
                _kv(rng, (batch, m.num_kv_heads, past, m.head_dim), kv) for _ in range(2))
        (hidden,) = run("embed", {**feeds, "input_ids": ids}).values()
        chained = run(m.spans[(0, L - 1)], {**feeds, "hidden_states": hidden})
        (logits,) = run("final_head", {"hidden_states": np.ascontiguousarray(chained["hidden_states_out"][:, -1])}).values()
        got = run(FULL_STEP, {**feeds, "input_ids": ids})
        worst = max(worst, float(np.max(np.abs(got["logits"].astype(np.float64) - logits))))
        cache = max(cache, *(float(np.max(np.abs(got[k].astype(np.float64) - v.astype(np.float64))))
                             for k, v in chained.items() if k.startswith("present_")))
    if not (worst <= LOGITS_TOLERANCE and cache <= TOLERANCE):
        raise ExportError(f"{FULL_STEP} differs from embed -> span -> head run one after another: logits by "
                          f"{worst:.3g} (allowed {LOGITS_TOLERANCE}), cache by {cache:.3g} (allowed {TOLERANCE})")
    return worst


def _outputs(session, feeds: dict) -> dict:
    """Every output of `session` by name, fed the entries of `feeds` it takes."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {n.name: feeds[n.name] for n in session.get_inputs()})))


def _kv(rng, shape, dtype: np.dtype) -> np.ndarray:
    if dtype == np.int8:
        return rng.integers(-127, 128, shape).astype(np.int8)
    return rng.standard_normal(shape).astype(dtype)
