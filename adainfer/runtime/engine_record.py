"""The record written beside the engines, and the check that refuses engines built elsewhere.

Engines are tied to the GPU model and the TensorRT version (TensorRT#564), so they live in
`engines/<gpu name>_trt<version>/` with `engine.json`: GPU name, compute capability, TensorRT
version, build options, the bundle's manifest digest (`Manifest.digest()`: what the export
decided, so `adainfer calib` adding attachments to manifest.json does not make the engines
stale, while a re-export does), and per graph its engine file, sha256 and profiles. The
exit-decider engine (`exit_decider`, built from a calibration's `exit_head_folded.onnx`) also
records the sha256 of that file and the policy's feature order: it belongs to one calibration.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import BundleError
from ..manifest import check_manifest_digest, manifest_digest
from .gpu_errors import EngineError, EngineMismatchError

ENGINES_DIR = "engines"
RECORD_NAME = "engine.json"
RECORD_VERSION = 2
RECORD_KEYS = ("record_version", "gpu", "compute_capability", "tensorrt", "options", "manifest_digest", "graphs")
DECIDER = "exit_decider"  # the graph / engine name of the on-device exit decision


@dataclass(frozen=True)
class DeviceInfo:
    gpu: str  # e.g. "Orin" or "NVIDIA H100 80GB HBM3"
    compute_capability: str  # e.g. "8.7"
    tensorrt: str  # e.g. "10.3.0"


def engines_dirname(device: DeviceInfo) -> str:
    """`<gpu name>_trt<version>` with anything but letters, digits, dot and dash made `_`."""
    gpu = re.sub(r"[^A-Za-z0-9.-]+", "_", device.gpu).strip("_") or "gpu"
    return f"{gpu}_trt{device.tensorrt}"


def engines_path(bundle_root: Path, device: DeviceInfo) -> Path:
    return Path(bundle_root) / ENGINES_DIR / engines_dirname(device)


def make_record(device: DeviceInfo, options: dict, digest: str, graphs: dict) -> dict:
    """`digest`: the bundle's `manifest_digest` (not the sha256 of manifest.json's bytes)."""
    return {"record_version": RECORD_VERSION, "gpu": device.gpu, "compute_capability": device.compute_capability,
            "tensorrt": device.tensorrt, "options": options, "manifest_digest": digest, "graphs": graphs}


def read_record(directory: Path) -> dict:
    path = Path(directory) / RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: unreadable engine record ({str(exc).splitlines()[0]}); rebuild with `adainfer build-engines`") from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise EngineError(f"{path}: engine record lacks {missing[0]} (written by an older adainfer?); rebuild with "
                          f"`adainfer build-engines`")
    return record


def check_record(record: dict, device: DeviceInfo, bundle_root: Path) -> None:
    """Refuse engines built for another GPU, TensorRT version or export of the bundle, in one line."""
    bundle = str(bundle_root)
    built = f"{record['gpu']} (sm {record['compute_capability']}) with TensorRT {record['tensorrt']}"
    here = f"{device.gpu} (sm {device.compute_capability}) with TensorRT {device.tensorrt}"
    if (record["gpu"], record["compute_capability"], record["tensorrt"]) != (device.gpu, device.compute_capability, device.tensorrt):
        raise EngineMismatchError(f"engines were built for {built}, this device is {here}: rebuild on this device "
                                  f"with `adainfer build-engines {bundle}`")
    try:
        check_manifest_digest(Path(bundle_root), record["manifest_digest"], "these engines")
    except BundleError as exc:
        if not str(exc).startswith("these engines"):
            raise  # the bundle's own manifest is unreadable: say that
        raise EngineMismatchError(f"engines were built from another export of this bundle (manifest digest "
                                  f"{str(record['manifest_digest'])[:12]}, the bundle has {manifest_digest(Path(bundle_root))[:12]}): "
                                  f"rebuild on this device with `adainfer build-engines {bundle}`") from None


def find_engines(bundle_root: Path, device: DeviceInfo) -> tuple[Path, dict]:
    """The engines directory for this device, checked; refuses with one line when there is none."""
    root = Path(bundle_root)
    directory = engines_path(root, device)
    if (directory / RECORD_NAME).is_file():
        record = read_record(directory)
        check_record(record, device, root)
        return directory, record
    others = sorted(p for p in (root / ENGINES_DIR).glob(f"*/{RECORD_NAME}")) if (root / ENGINES_DIR).is_dir() else []
    for path in others:  # built elsewhere: say for what
        check_record(read_record(path.parent), device, root)
    raise EngineMismatchError(f"no TensorRT engines for this device in {root}: build them here with "
                              f"`adainfer build-engines {root}`")


def decider_source(folded_sha256: str, features: list[str]) -> dict:
    """What an exit-decider engine was built from (kept in its graph entry as `source`)."""
    return {"head_sha256": folded_sha256, "features": list(features)}


def check_decider(record: dict, folded_sha256: Optional[str], features: list[str], bundle_root: Path) -> None:
    """Refuse, in one line, to decide with an exit-decider engine of another calibration (or none)."""
    entry = record["graphs"].get(DECIDER)
    how = f"rebuild on this device with `adainfer build-engines {bundle_root}` (after `adainfer calib`)"
    if entry is None:
        raise EngineMismatchError(f"these engines have no exit decider (built before the bundle was calibrated?): {how}")
    if entry.get("source") != decider_source(folded_sha256 or "", features):
        raise EngineMismatchError(f"the exit-decider engine was built for another calibration of this bundle: {how}")
