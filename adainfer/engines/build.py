"""Build one TensorRT engine per graph of a bundle, on the device that will run them.

TensorRT 10.3+ and 11.x Python API (docs.nvidia.com/deeplearning/tensorrt, Python API): networks
are **strongly typed** (`Builder.create_network(1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)`),
the only mode TensorRT 11 has: every tensor's type comes from the ONNX graph, so fp16 engines come
from an fp16 bundle (`adainfer-export --precision fp16`, norms and softmax kept float32 by the
exporter) and int8 engines from graphs with explicit QuantizeLinear / DequantizeLinear nodes. No
builder precision flags, no per-layer precision, no implicit-quantization calibrator (TensorRT 11
has none of `BuilderFlag.FP16/INT8`, `OBEY_PRECISION_CONSTRAINTS`, `IInt8EntropyCalibrator2`,
`int8_calibrator`, `set_calibration_profile`, `set_output_type`). Also used:
`OnnxParser.parse_from_file`, `IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`,
one `create_optimization_profile()` per profile with `set_shape(name, min, opt, max)`,
`create_timing_cache` / `set_timing_cache` / `ITimingCache.serialize` for the cache kept in the
engines directory, `build_serialized_network`. `tools/gpu_api_surface.py` checks these names
against the TensorRT 10.3 and 11.4 bindings.

Engines are written into a staged directory beside the target (`adainfer.atomic.staged_directory`)
and swapped into place only when every graph has built and `engine.json` is written, so a failed,
interrupted or killed build leaves the previous engines (or none) and no partial directory.
For a bundle whose exit policy is folded (a linear classifier), the exit decider
(`exit_decider.onnx`, derived from `exit_head_folded.onnx`: decider.py) is built too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

from ..atomic import checkpoint, staged_directory
from ..manifest import Manifest
from ..runtime.bundle import open_bundle
from ..runtime.cuda_rt import device_info, import_tensorrt, require_gpu
from .decider import DECIDER_FILE, extra_features
from .errors import EngineError
from .metadata import DECIDER, RECORD_NAME, DeviceInfo, decider_source, engines_path, make_record
from .precision import engine_precision
from .profiles import BuildOptions, Profile, graph_profiles
from .recipes import TIMING_CACHE, engine_file, write_recipes

@dataclass
class BuiltEngine:
    """One graph's serialized engine."""

    data: bytes


class EngineBuilder(Protocol):
    def build(self, graph: str, onnx_path: Path, profiles: list[Profile], staging: Path) -> BuiltEngine: ...

    def timing_cache(self) -> bytes: ...


def build_engines(bundle_root: Path, options: BuildOptions, log: Callable[[str], None] = print) -> Path:
    """Build every graph's engine (and the exit decider's, for a folded exit policy) on this
    device; returns the engines directory. The precision is the bundle's (`engine_precision`)."""
    root = Path(bundle_root)
    bundle = open_bundle(root)
    manifest = bundle.manifest
    options = replace(options, precision=engine_precision(root, manifest, options.precision)).resolved(manifest)
    trt = import_tensorrt()
    require_gpu()
    device = device_info()
    target = engines_path(root, device)
    cache_path = target / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    builder = TrtBuilder(trt, options, cache_bytes)
    return write_engines(root, manifest, options, device, target, builder, log)


def write_engines(root: Path, manifest: Manifest, options: BuildOptions, device: DeviceInfo, target: Path,
                  builder: EngineBuilder, log: Callable[[str], None] = print) -> Path:
    """Build every engine into a staged directory (`adainfer.atomic.staged_directory`) that replaces
    `target` only once all are built and the record is written: a failure, Ctrl-C or SIGKILL
    leaves the previous engines (or none), and the next build removes the leftovers."""
    from .decider import bundle_folded_policy, write_bundle_decider

    with staged_directory(target, force=True, error=EngineError) as staging:
        spans = manifest.merged_graphs  # the tensorrt backend runs single blocks (no span, no full step)
        jobs = [(graph, spec, root / spec.file) for graph, spec in manifest.graphs.items() if graph not in spans]
        decider = write_bundle_decider(root, manifest, staging)
        if decider is not None:
            jobs.append((DECIDER, decider[0], decider[1]))
        graphs = {}
        for graph, spec, onnx_path in jobs:
            log(f"building {graph} ({options.precision})")
            profiles = graph_profiles(graph, spec, options)
            built = builder.build(graph, onnx_path, profiles, staging)
            (staging / engine_file(graph)).write_bytes(built.data)
            graphs[graph] = {"file": engine_file(graph), "sha256": hashlib.sha256(built.data).hexdigest(),
                             "size": len(built.data), "profiles": [p.to_dict() for p in profiles]}
            checkpoint(f"engine_{graph}")
        if decider is not None:
            policy, _, folded_sha = bundle_folded_policy(root, manifest)
            graphs[DECIDER].update(onnx=DECIDER_FILE, source=decider_source(folded_sha, extra_features(policy)))
        (staging / TIMING_CACHE).write_bytes(builder.timing_cache())
        write_recipes(root, manifest, options, staging, decider=decider)
        record = make_record(device, options.to_dict(), manifest.digest(), graphs)
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {target}")
    return target


def strongly_typed_network(trt, builder):
    """A network whose tensor types come from the ONNX graph (the only kind TensorRT 11 builds)."""
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


class TrtBuilder:
    """Builds one engine per call with TensorRT, sharing one timing cache."""

    def __init__(self, trt, options: BuildOptions, cache_bytes: bytes):
        self.trt, self.options, self.cache_bytes = trt, options, cache_bytes
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)

    def timing_cache(self) -> bytes:
        return self.cache_bytes

    def build(self, graph: str, onnx_path: Path, profiles: list[Profile], staging: Path) -> BuiltEngine:
        trt, options, builder = self.trt, self.options, self.builder
        network = strongly_typed_network(trt, builder)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            first = str(parser.get_error(0)).splitlines()[0] if parser.num_errors else "unknown error"
            raise EngineError(f"{graph}: TensorRT cannot parse {onnx_path.name}: {first}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
        cache = config.create_timing_cache(self.cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        for profile in profiles:
            config.add_optimization_profile(trt_profile(builder, profile))
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"{graph}: TensorRT could not build the engine (see its log above)")
        self.cache_bytes = bytes(cache.serialize())
        return BuiltEngine(bytes(serialized))


def trt_profile(builder, profile: Profile):
    p = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        p.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    return p
