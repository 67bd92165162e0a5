"""Checks run at export: every graph against its PyTorch module, the whole chain against transformers.

A bundle that does not reproduce the model is never renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch

from ..errors import ExportError
from .graphs import GraphDef, example_block_inputs, example_head_inputs

#: error allowed relative to the reference's largest magnitude (floor 1)
TOLERANCE = 1e-4


def _close(name: str, what: str, got: np.ndarray, want: np.ndarray, tol: Optional[float] = None) -> None:
    tol = TOLERANCE if tol is None else tol
    if got.shape != want.shape:
        raise ExportError(f"verification failed: {name} {what} has shape {got.shape}, PyTorch gives {want.shape}")
    if got.dtype.kind in "iu":
        if not np.array_equal(got, want):
            raise ExportError(f"verification failed: {name} {what} differs from PyTorch")
        return
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    if not np.isfinite(err) or err > tol * scale:
        raise ExportError(f"verification failed: {name} {what} differs from PyTorch by {err:.3g} (allowed {tol * scale:.3g})")


def _cases(gdef: GraphDef, exact: bool = True) -> list[dict[str, torch.Tensor]]:
    """The export example plus shapes it was not traced with: prefill (no past) and one-token decode;
    `exact` (float32 tolerance) adds a left-padded batch prefill and a multi-token step on a cache
    (speculative verification). Converted graphs keep the cases their tolerances were set on."""
    cases = [gdef.inputs]
    if gdef.name.startswith("block_"):
        geometry = _geometry_from(gdef)
        cases += [example_block_inputs(geometry, batch=1, seq=5, past=0, seed=7),
                  example_block_inputs(geometry, batch=3, seq=1, past=6, seed=8)]
        if exact:
            cases += [example_block_inputs(geometry, batch=2, seq=3, past=0, seed=11),
                      example_block_inputs(geometry, batch=1, seq=4, past=3, seed=12)]
    elif gdef.name.startswith("kv_fill_"):
        for batch, seq, seed in ((1, 5, 10), (3, 1, 11)):
            case = example_block_inputs(_geometry_from(gdef), batch=batch, seq=seq, past=2, seed=seed)
            cases.append({k: case[k] for k in gdef.inputs})
    elif gdef.name.endswith("_head"):
        cases.append(example_head_inputs(_geometry_from(gdef), rows=1, seed=9))
    return cases


class _Geometry:
    def __init__(self, hidden_size, num_kv_heads=0, head_dim=0):
        self.hidden_size, self.num_kv_heads, self.head_dim = hidden_size, num_kv_heads, head_dim


def _geometry_from(gdef: GraphDef) -> _Geometry:
    hidden = gdef.inputs["hidden_states"].shape[-1]
    if "past_key" in gdef.inputs:
        _, kv_heads, _, head_dim = gdef.inputs["past_key"].shape
        return _Geometry(hidden, kv_heads, head_dim)
    return _Geometry(hidden)


def verify_graph(gdef: GraphDef, path: Path, tolerance: Optional[float] = None) -> None:
    """Outputs of the ONNX graph against the module's. With a looser `tolerance` (quantized graphs) an
    integer output (the exit head's top-1 id) may differ only in rows whose reference `gap` is below it."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    for case in _cases(gdef, exact=tolerance is None or tolerance <= TOLERANCE):
        if gdef.build is not None and case["hidden_states"].shape[0] > 1 and case.get("past_key") is not None \
                and case["past_key"].shape[2] > 0 and case["hidden_states"].shape[1] > 1:
            continue  # fused attention refuses several tokens with a past in a batch (never run)
        with torch.no_grad():
            expected = gdef.module(*case.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(gdef.outputs, {k: v.numpy() for k, v in case.items() if k in wanted})
        expected = [e.detach().numpy() for e in expected]
        if tolerance is not None and tolerance > TOLERANCE and "gap" in gdef.outputs:
            near_tie = expected[gdef.outputs.index("gap")] < tolerance
            got = [np.where(near_tie, e, g) if g.dtype.kind in "iu" else g for g, e in zip(got, expected)]
        for out_name, g, e in zip(gdef.outputs, got, expected):
            if "attention_mask" in case:
                g, e = _real_positions(case["attention_mask"].numpy(), out_name, g), _real_positions(case["attention_mask"].numpy(), out_name, e)
            _close(gdef.name, out_name, g, e, tolerance)


def _real_positions(mask: np.ndarray, name: str, array: np.ndarray) -> np.ndarray:
    """A block output with its left-padding positions zeroed: nothing reads them, and fused attention
    computes them differently from the torch block (see `families/llama_fused.py`)."""
    if name.startswith("present_"):  # (batch, kv_heads, total, head_dim)
        return array * mask[:, None, :, None]
    if name == "hidden_states_out":  # (batch, sequence, hidden): the last `sequence` slots
        return array * mask[:, -array.shape[1]:, None]
    return array


def verify_against_transformers(model, bundle_dir: Path, seed: int = 0, tolerance: Optional[float] = None) -> None:
    """Last-position logits of the ONNX chain equal the model's own forward on a padded batch."""
    from ..runtime import load

    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (7, 4)]
    runtime = load(bundle_dir, check_digests=False)
    got = runtime.last_logits(prompts)
    for row, ids in enumerate(prompts):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, -1].float().numpy()
        _close("chain", f"last-position logits (prompt {row})", got[row], want, tolerance)
