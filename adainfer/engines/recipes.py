"""`trtexec.sh`: the trtexec command lines equivalent to `adainfer build-engines`.

For users who build with trtexec (or want to compare): one command per graph with its ONNX,
one `--minShapes/--optShapes/--maxShapes` triple per optimization profile (in profile-index
order), `--fp16`/`--int8`, `--precisionConstraints=obey` with `--layerPrecisions` and
`--layerOutputTypes` pinning the norm and softmax layers to fp32 (exact layer names: trtexec
accepts `*` only as the default for every other layer), the shared `--timingCacheFile` and
`--saveEngine`. When the bundle's exit policy is folded (`adainfer calib` with a linear
classifier), one more command builds `exit_decider.plan` from `exit_decider.onnx`, which is
written beside the script (decider.py), with its own profile (rows 1..max batch). Pure Python
(plus `onnx` to read the graphs): works without a GPU.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from ..atomic import staged_file
from ..manifest import GraphSpec, Manifest
from .errors import EngineError
from .metadata import DECIDER
from .profiles import BuildOptions, Profile, graph_profiles, shape_text
from .precision import fp32_nodes, nodes_from_onnx, trtexec_layer_precisions

RECIPE_NAME = "trtexec.sh"
TIMING_CACHE = "timing.cache"


def engine_file(graph: str) -> str:
    return f"{graph}.plan"


def calib_file(graph: str) -> str:
    return f"{graph}.calib"


def profile_flags(profiles: list[Profile]) -> list[str]:
    flags = []
    for profile in profiles:
        for kind, index in (("min", 0), ("opt", 1), ("max", 2)):
            spec = ",".join(f"{name}:{shape_text(shapes[index])}" for name, shapes in profile.shapes.items())
            flags.append(f"--{kind}Shapes={spec}")
    return flags


def trtexec_command(graph: str, onnx_rel: str, profiles: list[Profile], options: BuildOptions,
                    fp32_layers: list[tuple[str, str]]) -> list[str]:
    cmd = ["trtexec", f"--onnx={onnx_rel}", *profile_flags(profiles)]
    if options.precision in ("fp16", "int8"):
        cmd.append("--fp16")  # int8 engines keep fp16 for what int8 does not cover
    if options.precision == "int8":
        cmd += ["--int8", f"--calib={calib_file(graph)}"]
    if options.precision != "fp32" and fp32_layers:
        precisions, outputs = trtexec_layer_precisions(fp32_layers)
        cmd += ["--precisionConstraints=obey", f"--layerPrecisions={precisions}", f"--layerOutputTypes={outputs}"]
    cmd += [f"--memPoolSize=workspace:{options.workspace_mib}", f"--timingCacheFile={TIMING_CACHE}",
            f"--saveEngine={engine_file(graph)}", "--skipInference"]
    return cmd


Decider = Optional[tuple[GraphSpec, Path]]


def recipe_text(bundle_root: Path, manifest: Manifest, options: BuildOptions, onnx_prefix: str = "../..",
                fp32: Optional[dict[str, list[tuple[str, str]]]] = None, decider: Decider = None) -> str:
    """The script; `fp32` maps graph -> (layer name, op type) pairs to pin (default: the selected
    ONNX nodes, named as the parser names the main layer of each node); `decider`: the exit
    decider's interface and path, written beside the script (decider.write_bundle_decider)."""
    options = options.resolved(manifest)
    lines = ["#!/bin/sh",
             "# trtexec equivalents of `adainfer build-engines` (written by adainfer; run on the target device).",
             f"# precision {options.precision}, max batch {options.max_batch}, max prompt {options.max_seq}, "
             f"max context {options.max_context}",
             "# Each --minShapes/--optShapes/--maxShapes triple is one optimization profile, in index order:",
             "# sequence graphs: 0 = prefill (past_length 0), 1 = decode (sequence 1); heads: one rows profile.",
             "# `adainfer build-engines` pins the same nodes through layer metadata, which also covers helper",
             "# layers the parser adds (named <node>_<n>); trtexec here pins the layers named exactly as the nodes.",
             "# Without <graph>.calib (the int8 calibration caches an int8 build-engines run writes) --int8 uses placeholder ranges.",
             "set -e", 'cd "$(dirname "$0")"', ""]
    graphs = [(graph, spec, Path(bundle_root) / spec.file, f"{onnx_prefix}/{spec.file}")
              for graph, spec in manifest.graphs.items()]
    if decider is not None:
        graphs.append((DECIDER, decider[0], decider[1], decider[0].file))
        lines[-3:-3] = ["# exit_decider: the calibrated exit decision on the device (the folded exit head, cos_prev,",
                        "# norm_ratio and layer_frac computed inside), from exit_decider.onnx beside this script."]
    for graph, spec, path, onnx_rel in graphs:
        profiles = graph_profiles(graph, spec, options)
        if fp32 is not None:
            layers = fp32.get(graph, [])
        elif options.precision != "fp32":
            nodes = nodes_from_onnx(path)
            ops = {n.name: n.op_type for n in nodes}
            layers = [(name, ops[name]) for name in fp32_nodes(nodes)]
        else:
            layers = []
        # the decider has no int8 calibration data: fp16 (+ fp32 islands), as build-engines builds it
        opts = replace(options, precision="fp16") if graph == DECIDER and options.precision == "int8" else options
        cmd = trtexec_command(graph, onnx_rel, profiles, opts, layers)
        lines.append(" \\\n    ".join(shlex.quote(part) for part in cmd))
        lines.append("")
    return "\n".join(lines)


def write_recipes(bundle_root: Path, manifest: Manifest, options: BuildOptions, directory: Path,
                  fp32: Optional[dict[str, list[tuple[str, str]]]] = None, decider: Union[Decider, str] = "auto") -> Path:
    """Write trtexec.sh (one atomic file) into `directory`; `decider="auto"` also writes the
    bundle's exit decider there when its policy is folded."""
    from .decider import write_bundle_decider

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"cannot write {directory}: {exc.strerror or exc}") from None
    if decider == "auto":
        decider = write_bundle_decider(bundle_root, manifest, directory)
    text = recipe_text(bundle_root, manifest, options, fp32=fp32, decider=decider)
    path = directory / RECIPE_NAME
    with staged_file(path, EngineError) as tmp:
        tmp.write_text(text)
        tmp.chmod(0o755)
    return path
