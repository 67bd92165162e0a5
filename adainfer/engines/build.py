"""Build one TensorRT engine per graph of a bundle, on the device that will run them.

TensorRT 10 Python API as documented (docs.nvidia.com/deeplearning/tensorrt, Python API):
`Builder.create_network(0)` (explicit batch is the only mode in 10.x), `OnnxParser.parse_from_file`,
`IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`, one
`create_optimization_profile()` per profile with `set_shape(name, min, opt, max)`,
`create_timing_cache` / `set_timing_cache` / `ITimingCache.serialize` for the cache kept in the
engines directory, `BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS` with `layer.precision`
and `layer.set_output_type` for the fp32 islands, `build_serialized_network`.
int8 uses an `IInt8EntropyCalibrator2` (implicit quantization: deprecated since TensorRT 10.1
but still shipped in 10.3 on JetPack 6) fed with activations the ONNX Runtime CPU runtime
computes over calibration text, with a fixed calibration profile (`set_calibration_profile`).

Engines are written into a staged directory beside the target (`adainfer.atomic.staged_directory`)
and swapped into place only when every graph has built and `engine.json` is written, so a failed,
interrupted or killed build leaves the previous engines (or none) and no partial directory.
For a bundle whose exit policy is folded (a linear classifier), the exit decider
(`exit_decider.onnx`, derived from `exit_head_folded.onnx`: decider.py) is built too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from ..atomic import checkpoint, staged_directory
from ..manifest import Manifest
from ..runtime.bundle import open_bundle
from ..runtime.cuda_rt import DeviceBuffer, device_info, import_tensorrt, require_gpu, synchronize
from .errors import EngineError
from .decider import DECIDER_FILE, extra_features
from .metadata import DECIDER, RECORD_NAME, DeviceInfo, decider_source, engines_path, make_record
from .precision import Node, fp32_nodes, layer_nodes, nodes_from_onnx
from .profiles import BuildOptions, Profile, graph_profiles
from .recipes import TIMING_CACHE, calib_file, engine_file, write_recipes

DEFAULT_CALIB_PROMPTS = ("Once upon a time", "One day, a little girl", "The big dog", "Tom and his mom went",
                         "There was a bird", "Lily wanted to play", "The sun was hot and", "A boy found a box")


@dataclass
class BuiltEngine:
    """One graph's serialized engine and the fp32 pinning that went into it."""

    data: bytes
    pinned: list[tuple[str, str]] = field(default_factory=list)  # (layer name, op type)
    unmatched: list[str] = field(default_factory=list)  # selected ONNX nodes no layer came from


class EngineBuilder(Protocol):
    def build(self, graph: str, onnx_path: Path, profiles: list[Profile], staging: Path) -> BuiltEngine: ...

    def timing_cache(self) -> bytes: ...


def build_engines(bundle_root: Path, options: BuildOptions, calib_text: Optional[Path] = None,
                  log: Callable[[str], None] = print) -> Path:
    """Build every graph's engine (and the exit decider's, for a folded exit policy) on this
    device; returns the engines directory."""
    trt = import_tensorrt()
    require_gpu()
    root = Path(bundle_root)
    bundle = open_bundle(root)
    manifest = bundle.manifest
    options = options.resolved(manifest)
    device = device_info()
    target = engines_path(root, device)
    cache_path = target / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    builder = TrtBuilder(trt, options, cache_bytes, lambda: calibration_feeds(root, manifest, options, calib_text))
    return write_engines(root, manifest, options, device, target, builder, log)


def write_engines(root: Path, manifest: Manifest, options: BuildOptions, device: DeviceInfo, target: Path,
                  builder: EngineBuilder, log: Callable[[str], None] = print) -> Path:
    """Build every engine into a staged directory (`adainfer.atomic.staged_directory`) that replaces
    `target` only once all are built and the record is written: a failure, Ctrl-C or SIGKILL
    leaves the previous engines (or none), and the next build removes the leftovers."""
    from .decider import bundle_folded_policy, write_bundle_decider

    with staged_directory(target, force=True, error=EngineError) as staging:
        jobs = [(graph, spec, root / spec.file) for graph, spec in manifest.graphs.items()]
        decider = write_bundle_decider(root, manifest, staging)
        if decider is not None:
            jobs.append((DECIDER, decider[0], decider[1]))
        graphs, pinned_all = {}, {}
        for graph, spec, onnx_path in jobs:
            log(f"building {graph} ({options.precision})")
            profiles = graph_profiles(graph, spec, options)
            built = builder.build(graph, onnx_path, profiles, staging)
            (staging / engine_file(graph)).write_bytes(built.data)
            graphs[graph] = {"file": engine_file(graph), "sha256": hashlib.sha256(built.data).hexdigest(),
                             "size": len(built.data), "profiles": [p.to_dict() for p in profiles],
                             "fp32_layers": [name for name, _ in built.pinned], "fp32_nodes_not_found": built.unmatched}
            pinned_all[graph] = built.pinned
            checkpoint(f"engine_{graph}")
        if decider is not None:
            policy, _, folded_sha = bundle_folded_policy(root, manifest)
            graphs[DECIDER].update(onnx=DECIDER_FILE, source=decider_source(folded_sha, extra_features(policy)))
        (staging / TIMING_CACHE).write_bytes(builder.timing_cache())
        write_recipes(root, manifest, options, staging, fp32=pinned_all, decider=decider)
        record = make_record(device, options.to_dict(), manifest.digest(), graphs)
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {target}")
    return target


class TrtBuilder:
    """Builds one engine per call with TensorRT, sharing one timing cache."""

    def __init__(self, trt, options: BuildOptions, cache_bytes: bytes, calib_feeds: Callable[[], dict]):
        self.trt, self.options, self.cache_bytes = trt, options, cache_bytes
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self._calib_feeds, self._feeds = calib_feeds, None

    def timing_cache(self) -> bytes:
        return self.cache_bytes

    def build(self, graph: str, onnx_path: Path, profiles: list[Profile], staging: Path) -> BuiltEngine:
        trt, options, builder = self.trt, self.options, self.builder
        network = builder.create_network(0)
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
        pinned, unmatched = [], []
        if options.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            pinned, unmatched = pin_fp32(trt, network, nodes_from_onnx(onnx_path))
        calibrator = None
        if options.precision == "int8" and graph != DECIDER:  # the decider is built fp16 (+ fp32 islands)
            if self._feeds is None:
                self._feeds = self._calib_feeds()
            feeds = self._feeds[graph]
            config.set_flag(trt.BuilderFlag.INT8)
            calibrator = make_calibrator(trt, feeds, staging / calib_file(graph))
            config.int8_calibrator = calibrator
            fixed = {name: (a.shape, a.shape, a.shape) for name, a in feeds[0].items()}
            config.set_calibration_profile(trt_profile(builder, Profile("calibration", fixed)))
        serialized = builder.build_serialized_network(network, config)
        if calibrator is not None:
            calibrator.free()
        if serialized is None:
            raise EngineError(f"{graph}: TensorRT could not build the engine (see its log above)")
        self.cache_bytes = bytes(cache.serialize())
        return BuiltEngine(bytes(serialized), pinned, unmatched)


def trt_profile(builder, profile: Profile):
    p = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        p.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    return p


def pin_fp32(trt, network, nodes: Sequence[Node]) -> tuple[list[tuple[str, str]], list[str]]:
    """Hold the layers of the selected norm / softmax nodes in float32 (precision and float
    outputs); returns [(layer name, op type)] pinned and the selected nodes no layer came from."""
    chosen = set(fp32_nodes(nodes))
    ops = {n.name: n.op_type for n in nodes}
    names = set(ops)
    floats = (trt.float32, trt.float16)
    skip = (trt.LayerType.CONSTANT, trt.LayerType.SHAPE)
    pinned, matched = [], set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        origin = layer_nodes(layer.name, getattr(layer, "metadata", "") or "", names) & chosen
        if not origin or layer.type in skip:
            continue
        outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outs:
            continue
        layer.precision = trt.float32
        for j in outs:
            layer.set_output_type(j, trt.float32)
        pinned.append((layer.name, ops[sorted(origin)[0]]))
        matched |= origin
    return pinned, sorted(chosen - matched)


def make_calibrator(trt, feeds: list[dict[str, np.ndarray]], cache_path: Path):
    """An IInt8EntropyCalibrator2 over recorded inputs (one batch = one recorded call)."""
    from ..runtime.cuda_rt import new_stream

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.stream = new_stream()
            self.buffers = {name: DeviceBuffer(max(f[name].nbytes for f in feeds)) for name in feeds[0]}

        def get_batch_size(self):
            return 1  # explicit-batch networks: the batch is in the shapes

        def get_batch(self, names):
            if self.index >= len(feeds):
                return None
            feed = feeds[self.index]
            self.index += 1
            for name in names:
                self.buffers[name].upload(feed[name], self.stream)
            synchronize(self.stream)
            return [self.buffers[name].ptr for name in names]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            cache_path.write_bytes(bytes(cache))

        def free(self):
            for buf in self.buffers.values():
                buf.free()

    return Calibrator()


def calibration_feeds(root: Path, manifest: Manifest, options: BuildOptions, calib_text: Optional[Path],
                      max_windows: int = 16) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs every graph sees when the ONNX Runtime CPU runtime prefills windows of calibration
    text (the given file, else the model's own greedy continuations of a few prompts): the real
    activations the engines will meet. All windows have one length, the prefill opt length."""
    from ..runtime.model import load

    model = load(root)
    length = options.opt_seq
    if calib_text is not None:
        try:
            text = Path(calib_text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EngineError(f"cannot read calibration text {calib_text}: {exc}") from None
        ids = model.tokenizer.encode(text) if model.tokenizer else []
    else:
        ids = []
        for prompt in DEFAULT_CALIB_PROMPTS:
            ids += model.encode(prompt) + model.generate(prompt, max_new_tokens=length, stop_at_eos=False).tokens
    windows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:max_windows]
    if not windows:
        raise EngineError(f"calibration text has fewer than {length} tokens")
    feeds: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in manifest.graphs}
    m = manifest
    for window in windows:
        input_ids = np.asarray([window], dtype=np.int64)
        position_ids = np.arange(length, dtype=np.int64)[None, :]
        mask = np.ones((1, length), dtype=np.int64)
        empty = np.zeros((1, m.num_kv_heads, 0, m.head_dim), dtype=np.float32)
        embed_feed = {"input_ids": input_ids, "position_ids": position_ids}
        embed_names = [t.name for t in m.graphs["embed"].inputs]
        feeds["embed"].append({k: embed_feed[k] for k in embed_names})
        hidden = model.embed(input_ids, position_ids)
        for layer in range(m.num_layers):
            feeds[m.block_name(layer)].append({"hidden_states": hidden, "position_ids": position_ids,
                                               "attention_mask": mask, "past_key": empty, "past_value": empty})
            hidden = model.sessions[m.block_name(layer)].run(None, feeds[m.block_name(layer)][-1])[0]
            feeds["exit_head"].append({"hidden_states": np.ascontiguousarray(hidden[0], dtype=np.float32)})
        feeds["final_head"].append({"hidden_states": np.ascontiguousarray(hidden[0], dtype=np.float32)})
    return feeds
