"""Weights that several graphs of a bundle hold, stored once in one file that the graphs reference.

A bundle is one ONNX graph per piece, and pieces share weights: a tied model's embedding table
is also its LM head (in the embedding, the exit head and the final head: SmolLM2's 49,152 x 576
matrix, 113 MB, three times), each block's K/V projections reappear in its `kv_fill_NN` graph,
and every fused block carries the same rotary cos/sin caches. ONNX external data lets a tensor
live at (file, offset, length), and any number of graph files may point at the same bytes, so
`share_weights` moves every initializer that two or more graphs hold (byte-identical, same dtype
and shape) into `shared_weights.bin`, once, 4 KiB-aligned (ONNX Runtime can then map it), and
rewrites the graphs to reference it. The manifest lists the file under `files.shared_weights`
with its sha256, so `open_bundle` checks it like every other file.

An LM head traced from a tied `nn.Linear` holds the table transposed (MatMul with W^T). In head
graphs (input `(rows, hidden)`) such a MatMul whose W^T is another graph's initializer is
rewritten as `Gemm(x, W, transB=1)`, which reads the table in the embedding's layout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .graph_files import save_graph

SHARED_FILE = "shared_weights.bin"
#: tensor types stored two or more elements to a byte (numpy_helper.to_array unpacks them)
PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)}
#: initializers smaller than this stay in their graph (not worth a reference)
MIN_BYTES = 4096
ALIGN = 4096


def _digest(array: np.ndarray) -> str:
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _references_shared(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t)
               and {e.key: e.value for e in t.external_data}.get("location") == SHARED_FILE
               for t in model.graph.initializer)


def _tied_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    """Head graphs: MatMul node name -> its 2-D weight initializer (candidates for reading W^T as Gemm)."""
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            t = inits[node.input[1]]
            if len(t.dims) == 2 and np.prod(t.dims) * 4 >= MIN_BYTES:
                found[node.name or node.output[0]] = node.input[1]
    return found


def _scan(path: Path, is_head: bool) -> tuple[set[str], dict[str, str]]:
    """(digests of this graph's large initializers, digest of W^T -> initializer name for head MatMuls)."""
    model = onnx.load(str(path))
    digests = {_digest(numpy_helper.to_array(t)) for t in model.graph.initializer if _nbytes(t) >= MIN_BYTES}
    transposed = {}
    if is_head:
        inits = {t.name: t for t in model.graph.initializer}
        for weight in _tied_matmuls(model).values():
            transposed[_digest(numpy_helper.to_array(inits[weight]).T)] = weight
    return digests, transposed


def _nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def share_weights(bundle_dir: Path, graph_files: list[str], threshold: int) -> Optional[str]:
    """Store initializers held by two or more of `graph_files` once in `SHARED_FILE`; rewrite the graphs.

    Idempotent (a second run over the result rewrites nothing it does not have to) and safe to run
    after graphs were converted to another precision. Returns the shared file's name, or None when
    nothing is shared (and no shared file is left behind). Graphs keep their own remaining weights
    inline, or in `<file>.data` above `threshold` bytes (see `graph_files.save_graph`)."""
    root = Path(bundle_dir)
    holders: dict[str, set[str]] = {}
    heads: dict[str, dict[str, str]] = {}
    refs = set()
    for name in graph_files:
        digests, transposed = _scan(root / name, name.endswith("_head.onnx"))
        for d in digests:
            holders.setdefault(d, set()).add(name)
        if transposed:
            heads[name] = transposed
        if _references_shared(onnx.load(str(root / name), load_external_data=False)):
            refs.add(name)
    for name, transposed in heads.items():  # a head's W^T that another graph holds as W (the tied table)
        heads[name] = {d: w for d, w in transposed.items() if d in holders}
        for d in heads[name]:
            holders[d].add(name)
    shared = {d for d, names in holders.items() if len(names) > 1}
    touched = refs | {n for d in shared for n in holders[d]}
    target, old = root / SHARED_FILE, root / ".shared-weights-old"
    if target.exists():  # a second run: the graphs still read the previous file, from here
        old.mkdir(exist_ok=True)
        os.replace(target, old / SHARED_FILE)
    offsets: dict[str, tuple[int, int]] = {}
    with open(target, "wb") as out:
        for name in graph_files:
            if name not in touched:
                continue
            model = _load(root / name, old)
            _tie_heads(model, {d: w for d, w in heads.get(name, {}).items() if d in shared})
            kept = 0
            for t in model.graph.initializer:
                array = numpy_helper.to_array(t)
                digest = _digest(array) if array.nbytes >= MIN_BYTES else None
                if digest not in shared:  # inline (`_load` read it in: its old file goes)
                    kept += array.nbytes
                    continue
                if not t.HasField("raw_data"):  # typed fields (float_data, ...): raw bytes first
                    if t.data_type in PACKED_TYPES:
                        kept += array.nbytes
                        continue  # (never written so by ONNX Runtime's quantizers: stays inline)
                    t.CopyFrom(numpy_helper.from_array(array, t.name))
                if digest not in offsets:
                    out.seek(0, os.SEEK_END)
                    start = -(-out.tell() // ALIGN) * ALIGN
                    out.write(b"\0" * (start - out.tell()))
                    data = t.raw_data  # as stored: 4-bit types stay packed two to a byte
                    out.write(data)
                    offsets[digest] = (start, len(data))
                start, length = offsets[digest]
                external_data_helper.set_external_data(t, SHARED_FILE, offset=start, length=length)
                t.ClearField("raw_data")
            (root / f"{name}.data").unlink(missing_ok=True)
            save_graph(model, root / name, kept, threshold)
    shutil.rmtree(old, ignore_errors=True)
    if not offsets:
        target.unlink()
        return None
    return SHARED_FILE


def _load(path: Path, old: Path) -> onnx.ModelProto:
    """A graph with its external data read in, the shared tensors from the previous shared file in `old`."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            location = {e.key: e.value for e in t.external_data}.get("location")
            external_data_helper.load_external_data_for_tensor(t, str(old if location == SHARED_FILE else path.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    return model


def _tie_heads(model: onnx.ModelProto, tied: dict[str, str]) -> None:
    """Rewrite `MatMul(x, W^T)` as `Gemm(x, W, transB=1)` for the shared W^T initializers in `tied` (digest -> name)."""
    if not tied:
        return
    inits = {t.name: t for t in model.graph.initializer}
    names = set(tied.values())
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in names:
            weight = inits[node.input[1]]
            table = numpy_helper.to_array(weight).T.copy()
            weight.CopyFrom(numpy_helper.from_array(table, weight.name))
            node = helper.make_node("Gemm", [node.input[0], weight.name], list(node.output), name=node.name, transB=1)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
