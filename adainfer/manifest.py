"""The bundle manifest: one typed definition that the exporter writes and the runtime reads.

Pure Python (no numpy, no torch) so that both sides share it. Loading is strict:
an unknown schema version, a missing or extra field, a wrong type or a file name that
leaves the bundle directory is refused with a `BundleError` naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: symbolic dims are strings (e.g. "batch")."""

    name: str
    dtype: str
    shape: list[Union[int, str]]


@dataclass(frozen=True)
class FileSpec:
    """A file of the bundle, with the digest it was written with."""

    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: its file, digest and interface."""

    file: str
    sha256: str
    size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str = "fp32"
    data_files: list[FileSpec] = field(default_factory=list)


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates for one token: `constant + per_context_token * context_length`."""

    constant: int
    per_context_token: int

    def at(self, context_length: int) -> int:
        return self.constant + self.per_context_token * context_length


@dataclass(frozen=True)
class Macs:
    """Compute per token of every graph, so savings can be counted honestly."""

    embed: int
    blocks: list[MacCount]
    exit_head: int
    final_head: int


@dataclass(frozen=True)
class ExporterInfo:
    adainfer: str
    torch: str
    transformers: str
    onnx: str
    opset: int


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to chain the graphs without the original model."""

    schema_version: int
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    padding_side: str
    bos_token_id: Optional[int]
    eos_token_ids: list[int]
    graphs: dict[str, GraphSpec]
    files: dict[str, FileSpec]
    macs: Macs
    exporter: ExporterInfo
    extras: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def block_name(index: int) -> str:
        return f"block_{index:02d}"

    @property
    def block_names(self) -> list[str]:
        return [self.block_name(i) for i in range(self.num_layers)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, bundle_dir: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        (Path(bundle_dir) / MANIFEST_NAME).write_text(text + "\n")

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError("manifest.json: expected a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError("manifest.json: schema_version is missing or not an integer")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"manifest.json: schema version {version} is newer than this adainfer reads "
                f"({SCHEMA_VERSION}); upgrade adainfer or re-export the bundle"
            )
        if version < SCHEMA_VERSION:
            raise BundleError(f"manifest.json: schema version {version} is no longer supported; re-export the bundle")
        manifest = _build(cls, data, "manifest")
        manifest._check_consistency()
        return manifest

    @classmethod
    def load(cls, bundle_dir: Path) -> "Manifest":
        path = Path(bundle_dir) / MANIFEST_NAME
        if not Path(bundle_dir).is_dir():
            raise BundleError(f"bundle directory not found: {bundle_dir}")
        if not path.is_file():
            raise BundleError(f"not a bundle (no {MANIFEST_NAME}): {bundle_dir}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def _check_consistency(self) -> None:
        expected = {"embed", "exit_head", "final_head", *self.block_names}
        missing = sorted(expected - set(self.graphs))
        if missing:
            raise BundleError(f"manifest.json: graphs missing: {', '.join(missing)}")
        if len(self.macs.blocks) != self.num_layers:
            raise BundleError("manifest.json: macs.blocks does not have one entry per layer")
        if self.padding_side not in ("left",):
            raise BundleError(f"manifest.json: unsupported padding_side {self.padding_side!r}")
        for positive in ("num_layers", "hidden_size", "vocab_size", "max_positions", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, positive) <= 0:
                raise BundleError(f"manifest.json: {positive} must be positive")
        for entry in self.all_files().values():
            check_relative_name(entry.file)

    def all_files(self) -> dict[str, Union[GraphSpec, FileSpec]]:
        """Every file the manifest vouches for, by key."""
        entries: dict[str, Union[GraphSpec, FileSpec]] = dict(self.files)
        for key, graph in self.graphs.items():
            entries[key] = graph
            for data in graph.data_files:
                entries[f"{key}:{data.file}"] = data
        return entries


def check_relative_name(name: str) -> None:
    """Refuse names that could reach outside the bundle directory."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or "\\" in name or any(part in ("..", "") for part in path.parts) or name.startswith("/"):
        raise BundleError(f"manifest.json: file name {name!r} is not a plain path inside the bundle")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_spec(bundle_dir: Path, name: str) -> FileSpec:
    path = Path(bundle_dir) / name
    return FileSpec(file=name, sha256=sha256_of(path), size=path.stat().st_size)


# ---------------------------------------------------------------- strict decoding


def _build(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BundleError(f"manifest.json: {where} must be an object")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        extra = sorted(set(value) - set(fields))
        if extra:
            raise BundleError(f"manifest.json: unknown field {where}.{extra[0]}")
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise BundleError(f"manifest.json: missing field {where}.{name}")
            kwargs[name] = _build(hints[name], value[name], f"{where}.{name}")
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in args:
            try:
                return _build(arg, value, where)
            except BundleError:
                continue
        raise BundleError(f"manifest.json: {where} has the wrong type")
    if origin is list:
        if not isinstance(value, list):
            raise BundleError(f"manifest.json: {where} must be a list")
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"manifest.json: {where} must be an object")
        _, item = typing.get_args(tp)
        return {str(k): _build(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise BundleError(f"manifest.json: {where} must be null")
        return None
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise BundleError(f"manifest.json: {where} must be an integer")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise BundleError(f"manifest.json: {where} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise BundleError(f"manifest.json: {where} must be a string")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise BundleError(f"manifest.json: {where} must be true or false")
        return value
    raise TypeError(f"unsupported manifest type {tp!r}")
