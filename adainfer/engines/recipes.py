"""`trtexec.sh`: the trtexec command lines equivalent to `adainfer build-engines`.

For users who build with trtexec (or want to compare): one command per graph with its ONNX,
one `--minShapes/--optShapes/--maxShapes` triple per optimization profile (in profile-index
order), `--stronglyTyped` (the precision is the graphs' own, as build-engines builds them), the
shared `--timingCacheFile` and `--saveEngine`. When the bundle's exit policy is folded (`adainfer
calib` with a linear classifier), one more command builds `exit_decider.plan` from
`exit_decider.onnx`, which is written beside the script (decider.py), with its own profile (rows
1..max batch). Pure Python (plus `onnx` to read the graphs): works without a GPU.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional, Union

from ..atomic import staged_file
from ..manifest import GraphSpec, Manifest
from .errors import EngineError
from .metadata import DECIDER
from .profiles import BuildOptions, Profile, graph_profiles, shape_text

RECIPE_NAME = "trtexec.sh"
TIMING_CACHE = "timing.cache"


def engine_file(graph: str) -> str:
    return f"{graph}.plan"


def profile_flags(profiles: list[Profile]) -> list[str]:
    flags = []
    for profile in profiles:
        for kind, index in (("min", 0), ("opt", 1), ("max", 2)):
            spec = ",".join(f"{name}:{shape_text(shapes[index])}" for name, shapes in profile.shapes.items())
            flags.append(f"--{kind}Shapes={spec}")
    return flags


def trtexec_command(graph: str, onnx_rel: str, profiles: list[Profile], options: BuildOptions) -> list[str]:
    return ["trtexec", f"--onnx={onnx_rel}", *profile_flags(profiles), "--stronglyTyped",
            f"--memPoolSize=workspace:{options.workspace_mib}", f"--timingCacheFile={TIMING_CACHE}",
            f"--saveEngine={engine_file(graph)}", "--skipInference"]


Decider = Optional[tuple[GraphSpec, Path]]


def recipe_text(bundle_root: Path, manifest: Manifest, options: BuildOptions, onnx_prefix: str = "../..",
                decider: Decider = None) -> str:
    """The script; `decider`: the exit decider's interface and path, written beside the script
    (decider.write_bundle_decider)."""
    options = options.resolved(manifest)
    lines = ["#!/bin/sh",
             "# trtexec equivalents of `adainfer build-engines` (written by adainfer; run on the target device).",
             f"# precision {options.precision}, max batch {options.max_batch}, max prompt {options.max_seq}, "
             f"max context {options.max_context}",
             "# Each --minShapes/--optShapes/--maxShapes triple is one optimization profile, in index order:",
             "# sequence graphs: 0 = prefill (past_length 0), 1 = decode (sequence 1); heads: one rows profile.",
             "# Strongly typed networks: every tensor keeps the type the ONNX graph gives it (fp16 engines from an",
             "# fp16 bundle, int8 from explicit Q/DQ nodes), as `adainfer build-engines` builds them.",
             "set -e", 'cd "$(dirname "$0")"', ""]
    graphs = [(graph, spec, Path(bundle_root) / spec.file, f"{onnx_prefix}/{spec.file}")
              for graph, spec in manifest.graphs.items() if graph not in manifest.merged_graphs]
    if decider is not None:
        graphs.append((DECIDER, decider[0], decider[1], decider[0].file))
        lines[-3:-3] = ["# exit_decider: the calibrated exit decision on the device (the folded exit head, cos_prev,",
                        "# norm_ratio and layer_frac computed inside), from exit_decider.onnx beside this script."]
    for graph, spec, path, onnx_rel in graphs:
        profiles = graph_profiles(graph, spec, options)
        cmd = trtexec_command(graph, onnx_rel, profiles, options)
        lines.append(" \\\n    ".join(shlex.quote(part) for part in cmd))
        lines.append("")
    return "\n".join(lines)


def write_recipes(bundle_root: Path, manifest: Manifest, options: BuildOptions, directory: Path,
                  decider: Union[Decider, str] = "auto") -> Path:
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
    text = recipe_text(bundle_root, manifest, options, decider=decider)
    path = directory / RECIPE_NAME
    with staged_file(path, EngineError) as tmp:
        tmp.write_text(text)
        tmp.chmod(0o755)
    return path
