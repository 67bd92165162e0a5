"""Open a bundle directory: read its manifest and check every file it vouches for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import BundleError
from ..manifest import Manifest, TensorSpec, sha256_of
from .onnx_refs import check_external_data

#: ONNX Runtime's type strings -> the manifest's dtype names
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.root / name

    def graph_path(self, graph: str) -> Path:
        return self.root / self.manifest.graphs[graph].file

    @property
    def tokenizer_path(self) -> Path | None:
        spec = self.manifest.files.get("tokenizer")
        return self.root / spec.file if spec else None

    def digest(self) -> str:
        """The manifest digest that engines and classifiers built from this bundle record."""
        return self.manifest.digest()

    def check_session(self, graph: str, session: Any) -> None:
        """Refuse a graph whose actual interface (an ONNX Runtime session's inputs and outputs)
        disagrees with the manifest's tensor specs: names, dtypes and ranks."""
        spec = self.manifest.graphs[graph]
        for kind, declared, actual in (("inputs", spec.inputs, session.get_inputs()),
                                       ("outputs", spec.outputs, session.get_outputs())):
            try:
                found = [(a.name, ORT_DTYPES.get(a.type, a.type), _shape(a)) for a in actual]
            except Exception as exc:  # onnxruntime cannot describe a corrupt graph's interface
                raise BundleError(f"{spec.file}: cannot read the graph's {kind} ({type(exc).__name__})") from None
            check_interface(f"{spec.file} {kind}", declared, found)


def _shape(node_arg: Any):
    """A session input's shape, or None where its symbolic dimension names cannot be read."""
    try:
        return node_arg.shape
    except UnicodeDecodeError:
        return None


def check_interface(where: str, declared: list[TensorSpec], actual: Iterable[tuple[str, str, Any]]) -> None:
    """Compare a graph's (name, dtype, shape) list with the manifest's specs; one-line `BundleError`."""
    actual = list(actual)
    names = [a[0] for a in actual]
    if sorted(names) != sorted(t.name for t in declared):
        raise BundleError(f"{where}: the graph has {', '.join(names) or 'none'}, the manifest says "
                          f"{', '.join(t.name for t in declared) or 'none'}")
    by_name = {a[0]: a for a in actual}
    for t in declared:
        _, dtype, shape = by_name[t.name]
        if dtype != t.dtype:
            raise BundleError(f"{where}: {t.name} is {dtype} in the graph, {t.dtype} in the manifest")
        if shape is not None and len(shape) != len(t.shape):
            raise BundleError(f"{where}: {t.name} has {len(shape)} dimensions in the graph, {len(t.shape)} in the manifest")
        for i, (got, want) in enumerate(zip(shape or [], t.shape)):
            if isinstance(got, int) and isinstance(want, int) and got != want:
                raise BundleError(f"{where}: {t.name} dimension {i} is {got} in the graph, {want} in the manifest")


def open_bundle(root: Path, check_digests: bool = True) -> Bundle:
    """Read and validate a bundle; `check_digests=False` checks sizes only (fast start on trusted media).

    Every file the manifest lists must be a regular file inside the bundle (a link may point
    only to another place inside it), of the recorded size and, unless `check_digests` is
    False, the recorded sha256. Files the manifest does not list are ignored."""
    root = Path(root)
    manifest = Manifest.load(root)
    resolved_root = root.resolve()
    for key, spec in manifest.all_files().items():
        path = root / spec.file
        if not os.path.lexists(path):
            raise BundleError(f"bundle {root}: missing file {spec.file}")
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise BundleError(f"bundle {root}: {spec.file} is a broken or looping link") from None
        try:
            resolved.relative_to(resolved_root)
        except ValueError:
            raise BundleError(f"bundle {root}: {spec.file} points outside the bundle") from None
        if not resolved.is_file():
            raise BundleError(f"bundle {root}: {spec.file} is not a regular file")
        try:
            size = resolved.stat().st_size
            if size != spec.size:
                raise BundleError(f"bundle {root}: {spec.file} has {size} bytes, the manifest says {spec.size} (corrupt or modified)")
            if check_digests and sha256_of(resolved) != spec.sha256:
                raise BundleError(f"bundle {root}: sha256 of {spec.file} does not match the manifest (corrupt or modified)")
        except OSError as exc:
            raise BundleError(f"bundle {root}: cannot read {spec.file} ({exc.strerror or exc})") from None
    check_external_data(root, manifest)  # the files the graphs make ONNX Runtime open are listed ones
    return Bundle(root=root, manifest=manifest)
