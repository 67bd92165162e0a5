"""A verified float32 bundle converted to another precision: graphs, checks, manifest.

Used by the export (`export_model(..., precision=...)`, inside its staging directory) and on its own
(`convert_bundle`: an existing float32 bundle copied into a new one at another precision, without
exporting from PyTorch again; the bench and the tests convert one float32 export several ways).
Every converted graph gets the structural check (`verify.verify_graph_structure`); the converted
chain must keep top-1 agreement and perplexity on held-out text within `quality.THRESHOLDS`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from ..manifest import Manifest
from . import quality, quantize, staging
from .families import adapter_for
from .graphs import graph_defs
from .verify import verify_graph_structure

HEAD_GRAPHS = ("embed", "exit_head", "final_head")
#: what `head_bits` converts in a float32 bundle: the LM heads, read in full at every token (and at every exit)
LM_HEADS = ("exit_head", "final_head")


def quantize_graphs(model, tmp: Path, manifest: Manifest, precision: str, heads: bool, verify: bool,
                    threshold: int, block_size: int, grid: str = "gguf", head_bits: Optional[int] = None,
                    head_refine: int = 0) -> Manifest:
    """Convert the verified float32 graphs of the bundle in `tmp` in place, check each one's structure, judge
    the converted chain's quality on held-out text against `model` (float32), rewrite the manifest.
    `grid`, `head_bits`: int4's (`quantize.convert`); `precision` "fp32" with `head_bits` converts only the LM heads
    (exit and final head) to `head_bits`-bit MatMulNBits: float32 blocks, a head that reads 4-8x fewer bytes at
    every token and every exit, judged by the quality check (`quality.THRESHOLDS["fp32-head8"]`). `head_refine`:
    the 8-bit LM heads rank at 4 bits and re-score their best `head_refine` tokens at 8 (`head_refine.py`)."""
    from .writer import _graph_spec, _share

    defs = {gdef.name: gdef for gdef in graph_defs(adapter_for(model))}
    graphs = dict(manifest.graphs)
    heads_only = precision == "fp32"  # float32 blocks, `head_bits` LM heads (the embedding stays float32)
    for name, spec in manifest.graphs.items():
        if heads_only:
            if name not in LM_HEADS:
                continue
        elif not (name in manifest.block_names or name.startswith("kv_fill_") or (heads and name in HEAD_GRAPHS)):
            continue
        path = tmp / spec.file
        bits = head_bits if precision in ("int4", "fp32") and name in HEAD_GRAPHS else None
        # an LM head at head_bits goes the int4 way: a GGUF Q8_0 table is re-encoded exactly at 8 bits
        quantize.convert(path, path, "int4" if heads_only else precision, external_data_threshold=threshold,
                         block_size=block_size, grid=grid, bits=bits, refine=head_refine if name in LM_HEADS else 0)
        if verify:
            with torch.no_grad():
                verify_graph_structure(defs[name], path)
        graphs[name] = dataclasses.replace(_graph_spec(path), precision=f"int{bits}" if heads_only else precision)
    settings = (quantize.nbits_settings("int4", block_size, grid, head_bits, head_refine) if heads_only
                else quantize.nbits_settings(precision, block_size, grid, head_bits, head_refine))
    info = {"precision": precision, "quantize_heads": heads, **settings,
            "verified": verify, "onnxruntime": quantize.ort_version()}
    if heads_only:
        info.update(bits=32, fused_projections=False)
    # the converted graphs hold their weights inline again: store what several of them hold once more
    files = {k: v for k, v in manifest.files.items() if k != "shared_weights"}
    graphs, files = _share(adapter_for(model), tmp, graphs, files, False, threshold)
    manifest = dataclasses.replace(manifest, graphs=graphs, files=files, extras={**manifest.extras, "quantization": info})
    manifest.save(tmp)
    if verify:
        tokenizer = tmp / "tokenizer.json"
        sequences = quality.held_out_sequences(tokenizer if tokenizer.is_file() else None, manifest.vocab_size,
                                               manifest.bos_token_id)
        result = quality.check(precision, quality.measure(tmp, sequences, quality.torch_reference(model, sequences)),
                               quality.THRESHOLDS[f"fp32-head{head_bits}"] if heads_only else None)
        manifest = dataclasses.replace(manifest, extras={**manifest.extras, "quantization": {**info, "quality": result}})
        manifest.save(tmp)
    return manifest


def convert_bundle(model, src: Path, out_dir: Path, precision: str, *, quantize_heads: Optional[bool] = None,
                   block_size: int = quantize.NBITS_BLOCK_SIZE, force: bool = False, verify: bool = True,
                   external_data_threshold: int = 1 << 30, grid: str = "gguf",
                   head_bits: Optional[int] = None, head_refine: int = 0) -> Manifest:
    """Write `out_dir`: the float32 bundle `src` (exported from `model`) at `precision`, checked as an export is."""
    from ..errors import ExportError
    from ..manifest import Manifest

    quantize.check_precision(precision)
    quantize.check_block_size(block_size)
    quantize.check_options(precision, grid, head_bits, head_refine, quantize_heads)
    heads = quantize.heads_by_default(precision) if quantize_heads is None else quantize_heads
    from .span_writer import add_full_span, without_spans

    manifest = without_spans(Manifest.load(src))  # spans are merged again from the converted blocks
    if any(g.precision != "fp32" for g in manifest.graphs.values()):
        raise ExportError(f"{src} is not a float32 bundle")
    staging.check_target(Path(out_dir), force)
    with staging.staged_directory(Path(out_dir), force=force) as tmp:
        manifest = staging.copy_export(src, manifest, tmp)
        manifest = quantize_graphs(model.eval().float(), tmp, manifest, precision, heads, verify,
                                   external_data_threshold, block_size, grid, head_bits, head_refine)
        manifest = add_full_span(tmp, manifest, external_data_threshold, check=verify)
    return manifest
