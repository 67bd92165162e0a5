"""The bundle manifest: one typed definition that the exporter writes and the runtime reads.

Pure Python (no numpy, no torch) so that both sides share it. Loading is strict:
an unknown schema version, a missing, extra or duplicated field, a wrong type, a number
that is not finite or out of range, inconsistent geometry, two entries for one file or a
file name that leaves the bundle directory is refused with a one-line `BundleError`
naming the field.

Files added after the export (calibration's policy and classifier, built engines) are
listed under `attachments`: they are checked on load like every other file, but do not
change `manifest_digest`, which identifies what the export decided (geometry, graph
interfaces and digests, model files). Whatever is built from a bundle records that
digest and is refused when the bundle it meets has another (`check_manifest_digest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
import os
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: integers beyond this are refused (they do not survive JSON readers that use doubles)
MAX_INT = 2**53
#: a manifest larger than this is refused before it is parsed
MAX_MANIFEST_BYTES = 64 << 20
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
MODEL_DTYPES = ("float32", "float16", "bfloat16")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = re.compile(r"block_(\d+)")
#: a span of blocks FIRST..LAST (0-based, inclusive) merged into one graph (`exporter/spans.py`)
SPAN = re.compile(r"span_(\d{2,})_(\d{2,})")
#: the kv_fill graphs of layers first..last side by side (an exit's skipped layers filled in one call)
FILL_SPAN = re.compile(r"kv_fill_(\d{2,})_(\d{2,})")
#: the embedding, every block and the final head merged into one graph (`exporter/spans.py`)
FULL_STEP = "full_step"


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
    #: per layer: norm + key/value projections that fill a skipped layer's cache (kv_fill_NN graphs)
    kv_fill: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ExporterInfo:
    adainfer: str
    torch: str
    transformers: str
    onnx: str
    opset: int


@dataclass(frozen=True)
class ModelSource:
    """The file a bundle was exported from when it was not a Hugging Face directory (a GGUF file)."""

    format: str  # "gguf"
    file: str  # its name, for the record (not a file of the bundle)
    size: int
    sha256: str
    quantization: Optional[str] = None  # e.g. "Q4_1": the file's own weight type, dequantized to float32 here


SOURCE_FORMATS = ("gguf",)


@dataclass(frozen=True)
class KVCacheFormat:
    """A quantized KV cache (exporter/kv_cache.py): the block graphs' past/present keys and values are
    `dtype`, scaled by static scales inside each block graph; omitted from the JSON for a float32 cache."""

    dtype: str  # "int8"
    scaling: str  # "per-channel": one scale per layer, K/V, KV head and channel; "per-tensor": one per layer and K/V
    margin: float  # scale = margin * calibrated max |x| / 127
    calibration: str  # the text the scales were taken from
    bytes_per_token: int  # keys and values of every layer, one token
    float32_bytes_per_token: int  # the same with a float32 cache
    scale_bytes: int  # the static scales, once per bundle (in the block graphs)
    quality: dict[str, Any] = field(default_factory=dict)  # the export's check on held-out text, when verified


KV_CACHE_DTYPES = ("int8",)
KV_CACHE_SCALINGS = ("per-channel", "per-tensor")


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
    #: files added after the export (calibration, engines): checked on load, outside `digest()`
    attachments: dict[str, FileSpec] = field(default_factory=dict)
    #: where the weights came from when not a Hugging Face directory; omitted from the JSON when None
    source: Optional[ModelSource] = None
    #: a quantized KV cache; None (omitted from the JSON): float32
    kv_cache: Optional[KVCacheFormat] = None

    @staticmethod
    def block_name(index: int) -> str:
        return f"block_{index:02d}"

    @property
    def block_names(self) -> list[str]:
        return [self.block_name(i) for i in range(self.num_layers)]

    @property
    def kv_dtype(self) -> str:
        """The dtype of the block graphs' past_key / past_value inputs: what an empty KV cache is made of."""
        if not self.num_layers:
            return "float32"
        return next((t.dtype for t in self.graphs[self.block_name(0)].inputs if t.name == "past_key"), "float32")

    @property
    def spans(self) -> dict[tuple[int, int], str]:
        """(first, last) block (0-based, inclusive) -> graph name of every span graph the bundle has."""
        return self._ranges(SPAN)

    @property
    def fill_spans(self) -> dict[tuple[int, int], str]:
        """(first, last) layer (0-based, inclusive) -> graph name of every merged kv_fill graph the bundle has."""
        return self._ranges(FILL_SPAN)

    def _ranges(self, pattern: re.Pattern) -> dict[tuple[int, int], str]:
        found = {}
        for key in self.graphs:
            match = pattern.fullmatch(key)
            if match:
                found[(int(match.group(1)), int(match.group(2)))] = key
        return found

    @property
    def full_step(self) -> Optional[str]:
        """The graph name of the full-depth step (embedding, all blocks and the final head as one graph), if any."""
        return FULL_STEP if FULL_STEP in self.graphs else None

    @property
    def merged_graphs(self) -> set[str]:
        """Graphs that merge others into one (spans, merged kv fills, the full step): the same computation, fewer
        calls."""
        return set(self.spans.values()) | set(self.fill_spans.values()) | ({self.full_step} if self.full_step else set())

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for optional in ("source", "kv_cache"):  # manifests (and digests) of bundles without them stay as they were
            if data[optional] is None:
                del data[optional]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def save(self, bundle_dir: Path) -> None:
        """Write `manifest.json` into `bundle_dir` atomically (readers see the old or the new one)."""
        from .atomic import atomic_write_text

        text = self.to_json()
        Manifest.from_dict(json.loads(text))  # never write a manifest the runtime would refuse
        atomic_write_text(Path(bundle_dir) / MANIFEST_NAME, text, BundleError)

    def digest(self) -> str:
        """sha256 of what the export decided: everything but `extras`, `attachments` and the merged graphs
        (spans and the full step: a span is its blocks merged, the same computation: adding spans after calibration, where the
        policy's evaluated layers are known, keeps the policy and engines built from the bundle valid)."""
        core = {k: v for k, v in self.to_dict().items() if k not in ("extras", "attachments")}
        merged = self.merged_graphs
        core["graphs"] = {k: v for k, v in core["graphs"].items() if k not in merged}
        text = json.dumps(core, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def attach(self, key: str, bundle_dir: Path, name: str) -> "Manifest":
        """A copy with file `name` of `bundle_dir` (its size and sha256) listed under `attachments[key]`."""
        check_relative_name(name)
        return dataclasses.replace(self, attachments={**self.attachments, key: file_spec(bundle_dir, name)})

    def detach(self, key: str) -> "Manifest":
        """A copy without `attachments[key]` (the file itself is not touched)."""
        return dataclasses.replace(self, attachments={k: v for k, v in self.attachments.items() if k != key})

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError(f"manifest.json: expected a JSON object, got {_json_kind(data)}")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError("manifest.json: schema_version is missing or not an integer")
        if version > SCHEMA_VERSION:
            version = version if version < 10**6 else "> 1000000"
            raise BundleError(
                f"manifest.json: schema version {version} is newer than this adainfer reads "
                f"({SCHEMA_VERSION}); upgrade adainfer or re-export the bundle"
            )
        if version < SCHEMA_VERSION:
            version = version if version > -10**6 else "< -1000000"
            raise BundleError(f"manifest.json: schema version {version} is no longer supported; re-export the bundle")
        manifest = _build(cls, data, "manifest")
        manifest._check_consistency()
        return manifest

    @classmethod
    def load(cls, bundle_dir: Path) -> "Manifest":
        return cls.from_dict(read_manifest_json(bundle_dir))

    def _check_consistency(self) -> None:
        for positive in ("num_layers", "hidden_size", "vocab_size", "max_positions", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, positive) <= 0:
                raise BundleError(f"manifest.json: {positive} must be positive, got {getattr(self, positive)}")
        if self.num_heads % self.num_kv_heads:
            raise BundleError(f"manifest.json: num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.dtype not in MODEL_DTYPES:
            raise BundleError(f"manifest.json: unsupported dtype {self.dtype!r} (expected one of {', '.join(MODEL_DTYPES)})")
        if self.padding_side not in ("left",):
            raise BundleError(f"manifest.json: unsupported padding_side {self.padding_side!r}")
        for where, token in [("bos_token_id", self.bos_token_id)] + [(f"eos_token_ids[{i}]", t) for i, t in enumerate(self.eos_token_ids)]:
            if token is not None and not 0 <= token < self.vocab_size:
                raise BundleError(f"manifest.json: {where} {token} is outside the vocabulary (0..{self.vocab_size - 1})")
        # one block graph per layer, no more; counted before listing block names, so that a
        # huge num_layers cannot make us build a huge list
        blocks = {k for k in self.graphs if _BLOCK.fullmatch(k)}
        if self.num_layers > len(blocks):
            raise BundleError(f"manifest.json: num_layers is {self.num_layers} but graphs has {len(blocks)} block graphs")
        extra = sorted(blocks - set(self.block_names))
        if extra:
            raise BundleError(f"manifest.json: graph {extra[0]} is not one of the {self.num_layers} blocks (block_00..)")
        missing = sorted({"embed", "exit_head", "final_head", *self.block_names} - set(self.graphs))
        if missing:
            raise BundleError(f"manifest.json: graphs missing: {', '.join(missing)}")
        if len(self.macs.blocks) != self.num_layers:
            raise BundleError("manifest.json: macs.blocks does not have one entry per layer")
        for key, graph in self.graphs.items():
            _check_interface(f"graphs.{_key(key)}", graph)
        self._check_geometry()
        seen: dict[str, str] = {}
        for key, entry in self.all_files().items():
            check_relative_name(entry.file)
            if PurePosixPath(entry.file) == PurePosixPath(MANIFEST_NAME):
                raise BundleError(f"manifest.json: {key} names the manifest itself")
            if not _SHA256.fullmatch(entry.sha256):
                raise BundleError(f"manifest.json: sha256 of {key} is not 64 lowercase hex digits")
            if entry.size < 0:
                raise BundleError(f"manifest.json: size of {key} is negative")
            normal = str(PurePosixPath(entry.file))
            if normal in seen:
                raise BundleError(f"manifest.json: {key} and {seen[normal]} both name the file {entry.file}")
            seen[normal] = key
        for where, value in _numbers(self.macs, "macs"):
            if value < 0:
                raise BundleError(f"manifest.json: {where} is negative")
        if self.source is not None:
            _check_source(self.source)
        self._check_kv_cache()

    def _check_kv_cache(self) -> None:
        """Every block's cache tensors have one dtype, the one `kv_cache` states (float32 without it)."""
        kv = self.kv_cache
        if kv is not None:
            if kv.dtype not in KV_CACHE_DTYPES:
                raise BundleError(f"manifest.json: kv_cache.dtype {kv.dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
            if kv.scaling not in KV_CACHE_SCALINGS:
                raise BundleError(f"manifest.json: kv_cache.scaling {kv.scaling!r} is not one of {', '.join(KV_CACHE_SCALINGS)}")
            if not 1.0 <= kv.margin <= 4.0:
                raise BundleError(f"manifest.json: kv_cache.margin {kv.margin} is outside [1, 4]")
            for what in ("bytes_per_token", "float32_bytes_per_token", "scale_bytes"):
                if getattr(kv, what) < 0:
                    raise BundleError(f"manifest.json: kv_cache.{what} is negative")
        expected = kv.dtype if kv is not None else "float32"
        for name in self.block_names:
            for t in [*self.graphs[name].inputs, *self.graphs[name].outputs]:
                if t.name in kv_names() and t.dtype != expected and not (kv is None and t.dtype in MODEL_DTYPES):
                    raise BundleError(f"manifest.json: graphs.{name} {t.name} is {t.dtype}, the KV cache is {expected}")

    def _check_geometry(self) -> None:
        """The graphs' tensor specs agree with the geometry: the tensors the runtime feeds exist
        and their fixed dimensions are the manifest's hidden size, KV heads, head size, vocabulary."""
        required = {"embed": (["input_ids"], ["hidden_states"]), "final_head": (["hidden_states"], ["logits"]),
                    "exit_head": (["hidden_states"], [])}
        block_io = (["hidden_states", "attention_mask", "past_key", "past_value"],
                    ["hidden_states_out", "present_key", "present_value"])
        fixed = {"hidden_states": {-1: ("hidden_size", self.hidden_size)},
                 "hidden_states_out": {-1: ("hidden_size", self.hidden_size)},
                 "logits": {-1: ("vocab_size", self.vocab_size)}}
        kv = kv_shape = {1: ("num_kv_heads", self.num_kv_heads), 3: ("head_dim", self.head_dim)}
        fixed.update({name: kv for name in ("past_key", "past_value", "present_key", "present_value")})
        def merged(key: str, first: int, last: int, data_in: str, data_out: str) -> None:
            """A graph merging blocks first..last: its data tensor in and out, every layer's past and present."""
            layers = [f"{i:02d}" for i in range(first, last + 1)]
            required[key] = ([data_in, "attention_mask"] + [f"past_{kv}_{i}" for i in layers for kv in ("key", "value")],
                             [data_out] + [f"present_{kv}_{i}" for i in layers for kv in ("key", "value")])
            fixed.update({f"{kind}_{kv}_{i}": kv_shape for i in layers for kind in ("past", "present")
                          for kv in ("key", "value")})

        for (first, last), key in self.spans.items():
            if not first < last < self.num_layers:
                raise BundleError(f"manifest.json: graph {key} is not a span of two or more of the {self.num_layers} blocks")
            merged(key, first, last, "hidden_states", "hidden_states_out")
        if FULL_STEP in self.graphs:
            merged(FULL_STEP, 0, self.num_layers - 1, "input_ids", "logits")
        for (first, last), key in self.fill_spans.items():
            if not first < last < self.num_layers:
                raise BundleError(f"manifest.json: graph {key} is not the kv fill of two or more of the {self.num_layers} layers")
            layers = [f"{i:02d}" for i in range(first, last + 1)]
            required[key] = (["hidden_states"], [f"{kv}_{i}" for i in layers for kv in ("key", "value")])
            fixed.update({f"{kv}_{i}": kv_shape for i in layers for kv in ("key", "value")})
        spans = self.merged_graphs  # checked last: a geometry error names the graph they merge
        for key, graph in sorted(self.graphs.items(), key=lambda item: item[0] in spans):
            needed = block_io if key in self.block_names else required.get(key, ([], []))
            for kind, names, specs in (("inputs", needed[0], graph.inputs), ("outputs", needed[1], graph.outputs)):
                present = {t.name for t in specs}
                for name in names:
                    if name not in present:
                        raise BundleError(f"manifest.json: graphs.{_key(key)}.{kind} has no {name}")
                for t in specs:
                    for axis, (what, value) in fixed.get(t.name, {}).items():
                        if (t.name in kv_names() or t.name.startswith(("past_", "present_"))) and len(t.shape) != 4:
                            raise BundleError(f"manifest.json: graphs.{_key(key)} {t.name} must have 4 dimensions")
                        dim = t.shape[axis] if t.shape else None
                        if isinstance(dim, int) and dim != value:
                            raise BundleError(f"manifest.json: graphs.{_key(key)} {t.name} has {dim} where {what} is {value}")

    def all_files(self) -> dict[str, Union[GraphSpec, FileSpec]]:
        """Every file the manifest vouches for, by key (`files`, graphs with their data, `attachments`)."""
        entries: dict[str, Union[GraphSpec, FileSpec]] = {f"files.{_key(k)}": v for k, v in self.files.items()}
        for key, graph in self.graphs.items():
            entries[f"graphs.{_key(key)}"] = graph
            for data in graph.data_files:
                entries[f"graphs.{_key(key)}:{_key(data.file)}"] = data
        entries.update({f"attachments.{_key(k)}": v for k, v in self.attachments.items()})
        return entries


def _check_source(source: ModelSource) -> None:
    if source.format not in SOURCE_FORMATS:
        raise BundleError(f"manifest.json: source.format {source.format!r} is not one of {', '.join(SOURCE_FORMATS)}")
    name = PurePosixPath(source.file)
    if not source.file or "/" in source.file or "\\" in source.file or name.name in (".", "..") or not source.file.isprintable():
        raise BundleError(f"manifest.json: source.file {source.file[:80]!r} is not a plain file name")
    if not _SHA256.fullmatch(source.sha256):
        raise BundleError("manifest.json: source.sha256 is not 64 lowercase hex digits")
    if source.size < 0:
        raise BundleError("manifest.json: source.size is negative")
    if source.quantization is not None and not (source.quantization.isprintable() and 0 < len(source.quantization) <= 64):
        raise BundleError("manifest.json: source.quantization is not a short printable name")


def kv_names() -> tuple[str, ...]:
    return ("past_key", "past_value", "present_key", "present_value")


def _check_interface(where: str, graph: GraphSpec) -> None:
    for kind, specs in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        if not specs:
            raise BundleError(f"manifest.json: {where}.{kind} is empty")
        names = [t.name for t in specs]
        for i, t in enumerate(specs):
            if not t.name:
                raise BundleError(f"manifest.json: {where}.{kind}[{i}] has an empty name")
            if names.count(t.name) > 1:
                raise BundleError(f"manifest.json: {where}.{kind} lists {t.name!r} twice")
            if t.dtype not in TENSOR_DTYPES:
                raise BundleError(f"manifest.json: {where}.{kind}[{i}].dtype {t.dtype!r} is not a tensor type")
            for d in t.shape:
                if (isinstance(d, int) and d < 0) or (isinstance(d, str) and not d):
                    raise BundleError(f"manifest.json: {where}.{kind}[{i}].shape has an invalid dimension {d!r}")


def _numbers(obj: Any, where: str):
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _numbers(getattr(obj, f.name), f"{where}.{f.name}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


def check_relative_name(name: str) -> None:
    """Refuse names that could reach outside the bundle directory (`..`, absolute, drive or odd characters)."""
    path = PurePosixPath(name)
    if (not name or path.is_absolute() or "\\" in name or ":" in name or ".." in path.parts or not path.parts
            or path.parts == (".",) or any(ord(c) < 32 or c == "\x7f" for c in name)):
        raise BundleError(f"manifest.json: file name {name!r} is not a plain path inside the bundle")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def _refuse_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise BundleError(f"manifest.json: field {k!r} appears twice in one object")
    return dict(pairs)


def _refuse_constant(name: str):
    raise BundleError(f"manifest.json: {name} is not a number JSON allows")


def check_bundle_path(bundle_dir: Any) -> None:
    """A bundle path given to the API is a str or path-like (one-line `BundleError` for None, numbers, ...)."""
    if not isinstance(bundle_dir, (str, os.PathLike)):
        raise BundleError(f"bundle path must be a path, got {'None' if bundle_dir is None else type(bundle_dir).__name__}")


def read_manifest_json(bundle_dir: Path) -> Any:
    """The parsed `manifest.json` of a bundle (not yet validated): one-line `BundleError`s for
    a missing directory or file, a manifest that leaves the bundle, unreadable or oversized
    files, non-UTF-8 text, invalid JSON, duplicate keys and NaN or infinite numbers."""
    check_bundle_path(bundle_dir)
    root = Path(bundle_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}" if not root.exists() else f"not a bundle directory: {bundle_dir}")
    if not os.path.lexists(path):
        raise BundleError(f"not a bundle (no {MANIFEST_NAME}): {bundle_dir}")
    if path.is_symlink():
        try:
            path.resolve(strict=True).relative_to(root.resolve())
        except (ValueError, OSError):
            raise BundleError(f"{path}: a link that points outside the bundle (or nowhere)") from None
    if not path.is_file():
        raise BundleError(f"{path}: not a regular file")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: {path.stat().st_size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})")
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits, deep nesting
        raise BundleError(f"{path}: not usable JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def manifest_digest(bundle_dir: Path) -> str:
    """The digest that engines, classifiers and policies built from a bundle record (see `Manifest.digest`)."""
    return Manifest.load(bundle_dir).digest()


def check_manifest_digest(bundle_dir: Path, recorded: str, what: str) -> None:
    """Refuse `what` (an engine, a classifier) built from another bundle than the one at `bundle_dir`."""
    actual = manifest_digest(bundle_dir)
    if recorded != actual:
        raise BundleError(f"{what} was built from another bundle (manifest digest {str(recorded)[:12]}, "
                          f"{bundle_dir} has {actual[:12]}); rebuild it")


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


def _key(key: str) -> str:
    """A field name as it can be shown on one line."""
    return key if key.isprintable() and len(key) <= 80 else repr(key[:80])


def _build(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BundleError(f"manifest.json: {where} must be an object")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        extra = sorted(set(value) - set(fields))
        if extra:
            raise BundleError(f"manifest.json: unknown field {where}.{_key(extra[0])}")
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
        present = [a for a in args if a is not type(None)]
        if value is not None and len(present) == 1 and dataclasses.is_dataclass(present[0]):
            return _build(present[0], value, where)  # an optional object: name the field that is wrong inside it
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
        return {str(k): _build(item, v, f"{where}.{_key(k)}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise BundleError(f"manifest.json: {where} must be null")
        return None
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise BundleError(f"manifest.json: {where} must be an integer")
        if not -MAX_INT <= value <= MAX_INT:
            raise BundleError(f"manifest.json: {where} is out of range")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise BundleError(f"manifest.json: {where} must be a number")
        if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT or not math.isfinite(value):
            raise BundleError(f"manifest.json: {where} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise BundleError(f"manifest.json: {where} must be a string")
        if "\x00" in value:
            raise BundleError(f"manifest.json: {where} contains a NUL character")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise BundleError(f"manifest.json: {where} must be true or false")
        return value
    raise TypeError(f"unsupported manifest type {tp!r}")
