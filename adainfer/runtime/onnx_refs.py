"""Which external-data files an ONNX graph makes ONNX Runtime open, read without the `onnx` package.

ONNX Runtime loads a tensor stored as external data from the `location` its TensorProto names,
relative to the graph file. The bundle's rule is that every file the runtime opens is listed in
the manifest with its sha256 and lies inside the bundle, so `open_bundle` reads these locations
from every ONNX file it vouches for (`check_external_data`) and refuses any that the manifest does
not list (a shared weight file several graphs reference is fine: it is listed once).

The runtime has no `onnx` dependency, so this walks the protobuf wire format directly: only the
messages that can hold tensors are entered (model -> graph -> initializers, sparse initializers,
node attributes and their subgraphs), everything else (raw weight bytes included) is skipped by
length without copying.
"""

from __future__ import annotations

import mmap
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..errors import BundleError

# field numbers (onnx/onnx.proto3)
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE = 5
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE, ATTR_SPARSES = 5, 6, 10, 11, 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_EXTERNAL_DATA = 13
ENTRY_KEY, ENTRY_VALUE = 1, 2


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of every length-delimited field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed
            yield number, pos, pos + length
            pos += length
        else:  # groups (3, 4) do not occur in ONNX
            raise _Malformed
    if pos != end:
        raise _Malformed


def _tensor(buf, start, end, out: set) -> None:
    for number, s, e in _fields(buf, start, end):
        if number == TENSOR_EXTERNAL_DATA:
            entry = {n: bytes(buf[a:b]) for n, a, b in _fields(buf, s, e)}
            if entry.get(ENTRY_KEY) == b"location":
                out.add(entry.get(ENTRY_VALUE, b"").decode("utf-8", "replace"))


def _sparse(buf, start, end, out: set) -> None:
    for number, s, e in _fields(buf, start, end):
        if number in (SPARSE_VALUES, SPARSE_INDICES):
            _tensor(buf, s, e, out)


def _graph(buf, start, end, out: set, depth: int) -> None:
    if depth > 64:
        raise _Malformed
    for number, s, e in _fields(buf, start, end):
        if number == GRAPH_INITIALIZER:
            _tensor(buf, s, e, out)
        elif number == GRAPH_SPARSE_INITIALIZER:
            _sparse(buf, s, e, out)
        elif number == GRAPH_NODE:
            for n, a, b in _fields(buf, s, e):
                if n == NODE_ATTRIBUTE:
                    _attribute(buf, a, b, out, depth)


def _attribute(buf, start, end, out: set, depth: int) -> None:
    for number, s, e in _fields(buf, start, end):
        if number in (ATTR_T, ATTR_TENSORS):
            _tensor(buf, s, e, out)
        elif number in (ATTR_G, ATTR_GRAPHS):
            _graph(buf, s, e, out, depth + 1)
        elif number in (ATTR_SPARSE, ATTR_SPARSES):
            _sparse(buf, s, e, out)


@contextmanager
def _model_fields(path: Path) -> Iterator[tuple]:
    """(buffer, [(field number, start, end) of the model's top-level fields]) of an ONNX file, mapped; no
    fields for an empty file."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            yield b"", []
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                yield buf, _fields(buf, 0, size)
            finally:
                buf.release()


def external_data_locations(path: Path) -> set[str]:
    """The `location` of every external-data tensor in an ONNX file (empty for self-contained graphs)."""
    out: set[str] = set()
    with _model_fields(path) as (buf, fields):
        try:
            for number, s, e in fields:
                if number == MODEL_GRAPH:
                    _graph(buf, s, e, out, 0)
        except _Malformed:
            pass  # not a valid model: ONNX Runtime refuses it when the session is created
    return out


def check_external_data(root: Path, manifest) -> None:
    """Every external-data file an ONNX file of the bundle names is a plain path inside the bundle
    that the manifest lists (and therefore checks: size and sha256)."""
    from ..manifest import check_relative_name

    entries = manifest.all_files()
    listed = {str(PurePosixPath(e.file)) for e in entries.values()}
    for entry in entries.values():
        if not entry.file.endswith(".onnx"):
            continue
        graph = PurePosixPath(entry.file)
        for location in sorted(external_data_locations(Path(root) / entry.file)):
            try:
                check_relative_name(location)
                name = str(graph.parent / location)
                check_relative_name(name)
            except BundleError:
                raise BundleError(f"bundle {root}: {entry.file} uses external data {location!r}, which is not a "
                                  f"plain path inside the bundle") from None
            if name not in listed:
                raise BundleError(f"bundle {root}: {entry.file} uses external data {name}, which the manifest "
                                  f"does not list (every file the runtime opens must be listed with its sha256)")


NODE_OUTPUT, NODE_OP_TYPE = 2, 4


def producers(path: Path) -> dict[str, str]:
    """Output name -> op type of every node in an ONNX file's main graph (read without the `onnx` package;
    empty for a file that is not a valid model)."""
    out: dict[str, str] = {}
    with _model_fields(path) as (buf, fields):
        try:
            for number, s, e in fields:
                if number != MODEL_GRAPH:
                    continue
                for n, a, b in _fields(buf, s, e):
                    if n != GRAPH_NODE:
                        continue
                    named = [(k, bytes(buf[x:y]).decode("utf-8", "replace")) for k, x, y in _fields(buf, a, b)
                             if k in (NODE_OUTPUT, NODE_OP_TYPE)]
                    op = next((v for k, v in named if k == NODE_OP_TYPE), "")
                    out.update({v: op for k, v in named if k == NODE_OUTPUT})
        except _Malformed:
            out.clear()
    return out
