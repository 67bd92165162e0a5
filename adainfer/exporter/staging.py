"""The exporter's atomic directory writes: `adainfer.atomic` with `ExportError` as the error type.

A crash, an exception or Ctrl-C leaves either the old complete directory or none. Temporary
directories of processes that died (SIGKILL) are removed by the next write to the same target.
`--force` replaces only a bundle (a directory with `manifest.json`) or an empty directory,
and never the model directory being exported or one that contains it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Optional

from .. import atomic
from ..atomic import PARTIAL, checkpoint, remove_stale  # noqa: F401  (re-exported)
from ..errors import ExportError
from ..manifest import MANIFEST_NAME, Manifest


def check_target(target: Path, force: bool) -> None:
    atomic.check_target(target, force, ExportError)
    target = Path(target)
    if force and target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_NAME).exists():
        raise ExportError(f"refusing to replace {target}: it is not a bundle (no {MANIFEST_NAME}); "
                          f"choose another output directory")


def check_not_inside(target: Path, model_dir: Optional[Path]) -> None:
    """Refuse an output directory that is the model directory or contains it."""
    if model_dir is None:
        return
    target, model_dir = Path(target).absolute().resolve(), Path(model_dir).absolute().resolve()
    if model_dir == target or target in model_dir.parents:
        raise ExportError(f"output directory {target} would replace the model directory {model_dir}")


@contextlib.contextmanager
def staged_directory(target: Path, force: bool = False):
    """Yield an empty directory; on success it replaces `target`, on any failure it is removed."""
    check_target(target, force)
    with atomic.staged_directory(target, force=force, error=ExportError) as tmp:
        yield tmp


def copy_export(src: Path, manifest: Manifest, tmp: Path) -> Manifest:
    """Copy into the staged `tmp` the graphs (with their data files) and model files `manifest` lists, for a
    conversion of the bundle `src`; not its attachments (model.onnx, a calibrated exit): they describe `src`.
    Returns the manifest without attachments, saved in `tmp`."""
    names = [f.file for f in manifest.files.values()]
    for graph in manifest.graphs.values():
        names += [graph.file] + [d.file for d in graph.data_files]
    for name in dict.fromkeys(names):
        shutil.copyfile(Path(src) / name, Path(tmp) / name)
    manifest = dataclasses.replace(manifest, attachments={})
    manifest.save(tmp)
    return manifest
