"""Export one graph definition to ONNX: traced with torch.onnx, or written directly (fused blocks).

Shared by the bundle writer and the monolithic graph (`monolithic.py`), so neither imports the other.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import onnx
import torch

from ..errors import ExportError
from .graph_files import save_graph
from .graphs import GraphDef

OPSET = 17


def export_graph(gdef: GraphDef, path: Path, threshold: int) -> None:
    """Export one graph; large ones keep their weights in `<name>.onnx.data` (ONNX external data)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in gdef.module.parameters())
    if gdef.build is not None:  # written directly (fused operators), not traced
        try:
            save_graph(gdef.build(), path, weight_bytes, threshold)
        except Exception as exc:
            raise ExportError(f"writing {gdef.name} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return
    scratch = path.parent / f".scratch-{gdef.name}"
    scratch.mkdir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                gdef.module,
                tuple(gdef.inputs.values()),
                str(scratch / "graph.onnx"),
                input_names=list(gdef.inputs),
                output_names=gdef.outputs,
                dynamic_axes=gdef.dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(scratch / "graph.onnx"))
        save_graph(model, path, weight_bytes, threshold)
    except Exception as exc:
        raise ExportError(f"exporting {gdef.name} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
