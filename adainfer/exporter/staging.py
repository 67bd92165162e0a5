"""Write a directory atomically: build it beside the target, rename it into place when complete.

A crash, an exception or Ctrl-C leaves either the old complete directory or none. Temporary
directories of processes that died (SIGKILL) are removed by the next write to the same target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ExportError

PARTIAL = ".partial-"
OLD = ".old-"


def check_target(target: Path, force: bool) -> None:
    target = Path(target)
    if target.exists() and not force:
        raise ExportError(f"output directory already exists: {target} (pass --force to replace it)")
    if target.exists() and not target.is_dir():
        raise ExportError(f"output path exists and is not a directory: {target}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path) -> None:
    """Remove leftovers of earlier writes to `target` whose process no longer runs."""
    parent = target.parent
    for marker in (PARTIAL, OLD):
        for path in parent.glob(f".{target.name}{marker}*"):
            try:
                pid = int(path.name[len(target.name) + 1 + len(marker):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: Path, force: bool = False):
    """Yield an empty directory; on success it replaces `target`, on any failure it is removed."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the bundle private
    try:
        yield tmp
        check_target(target, force)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD}{os.getpid()}-", dir=target.parent))
            os.rename(target, old / "bundle")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
