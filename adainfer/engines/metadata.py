"""The record written beside the engines, and the check that refuses engines built elsewhere.

Engines are tied to the GPU model and the TensorRT version (TensorRT#564), so they live in
`engines/<gpu name>_trt<version>/` with `engine.json`: GPU name, compute capability, TensorRT
version, build options, the sha256 of the bundle's manifest.json, and per graph its engine file,
sha256 and profiles.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..manifest import MANIFEST_NAME, sha256_of
from .errors import EngineError, EngineMismatchError

ENGINES_DIR = "engines"
RECORD_NAME = "engine.json"
RECORD_VERSION = 1
RECORD_KEYS = ("record_version", "gpu", "compute_capability", "tensorrt", "options", "manifest_sha256", "graphs")


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


def manifest_sha256(bundle_root: Path) -> str:
    return sha256_of(Path(bundle_root) / MANIFEST_NAME)


def make_record(device: DeviceInfo, options: dict, manifest_sha: str, graphs: dict) -> dict:
    return {"record_version": RECORD_VERSION, "gpu": device.gpu, "compute_capability": device.compute_capability,
            "tensorrt": device.tensorrt, "options": options, "manifest_sha256": manifest_sha, "graphs": graphs}


def read_record(directory: Path) -> dict:
    path = Path(directory) / RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: unreadable engine record ({str(exc).splitlines()[0]}); rebuild with `adainfer build-engines`") from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise EngineError(f"{path}: engine record lacks {missing[0]}; rebuild with `adainfer build-engines`")
    return record


def check_record(record: dict, device: DeviceInfo, manifest_sha: str, bundle: str = "BUNDLE") -> None:
    """Refuse engines built for another GPU, TensorRT version or manifest, in one line."""
    built = f"{record['gpu']} (sm {record['compute_capability']}) with TensorRT {record['tensorrt']}"
    here = f"{device.gpu} (sm {device.compute_capability}) with TensorRT {device.tensorrt}"
    if (record["gpu"], record["compute_capability"], record["tensorrt"]) != (device.gpu, device.compute_capability, device.tensorrt):
        raise EngineMismatchError(f"engines were built for {built}, this device is {here}: rebuild on this device "
                                  f"with `adainfer build-engines {bundle}`")
    if record["manifest_sha256"] != manifest_sha:
        raise EngineMismatchError(f"engines were built from a different manifest.json (bundle re-exported?): rebuild on "
                                  f"this device with `adainfer build-engines {bundle}`")


def find_engines(bundle_root: Path, device: DeviceInfo) -> tuple[Path, dict]:
    """The engines directory for this device, checked; refuses with one line when there is none."""
    root = Path(bundle_root)
    directory = engines_path(root, device)
    sha = manifest_sha256(root)
    if (directory / RECORD_NAME).is_file():
        record = read_record(directory)
        check_record(record, device, sha, str(root))
        return directory, record
    others = sorted(p for p in (root / ENGINES_DIR).glob(f"*/{RECORD_NAME}")) if (root / ENGINES_DIR).is_dir() else []
    for path in others:  # built elsewhere: say for what
        check_record(read_record(path.parent), device, sha, str(root))
    raise EngineMismatchError(f"no TensorRT engines for this device in {root}: build them here with "
                              f"`adainfer build-engines {root}`")

