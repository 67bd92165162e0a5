"""Atomic writes: a file or a directory appears complete at its path, or not at all.

Pure standard library (no numpy, no torch), so the exporter, calibration, engine builders
and the runtime can all use it.

* `staged_directory(target)`: build a whole new directory (an export) and swap it in.
* `staged_update(bundle_dir)`: add, replace or remove files of an existing directory (a
  calibration adding its classifier and re-writing the manifest) as one atomic change.
* `staged_file(path)`, `atomic_write_bytes`, `atomic_write_text`, `atomic_copy`: one file.

Everything is written under a hidden sibling of the target named
`.<target name>.partial-<pid>-<random>` and renamed into place (on Linux directories are
swapped with one `renameat2(RENAME_EXCHANGE)`). A crash, an exception, Ctrl-C or SIGKILL at
any point leaves the old complete target or the new complete target, never a mix; leftovers
of killed processes are removed (or, if a kill hit between the two renames of the fallback
swap, the old directory is put back) by the next write to the same target.

`checkpoint(name)` is a test hook: with `ADAINFER_TEST_KILL_AT=name` in the environment the
process kills itself with SIGKILL there, with `ADAINFER_TEST_PAUSE_AT=name` it prints
`paused at name` on stdout and sleeps until it is signalled. Without those variables it
only reads the environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional, Union

from .errors import AdainferError

PARTIAL = ".partial-"
KILL_ENV = "ADAINFER_TEST_KILL_AT"
PAUSE_ENV = "ADAINFER_TEST_PAUSE_AT"

Error = type[AdainferError]


# ------------------------------------------------------------------ test hook


def checkpoint(name: str) -> None:
    """Test hook (see the module docstring): kill or pause this process at a named point."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == name:
        print(f"paused at {name}", file=sys.stdout, flush=True)
        while True:
            time.sleep(3600)


# ------------------------------------------------------------------ leftovers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _partial_prefix(target: Path) -> str:
    return f".{target.name}{PARTIAL}"


def _partial_pid(target: Path, path: Path) -> Optional[int]:
    try:
        return int(path.name[len(_partial_prefix(target)):].split("-")[0])
    except ValueError:
        return None


def remove_stale(target: Path) -> None:
    """Remove leftovers of earlier writes to `target` whose process no longer runs.

    If such a process died between the two renames of the fallback swap (the target is
    gone, its old content sits in `<partial>/old`), the old content is put back first.
    """
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return
    for path in target.parent.glob(_partial_prefix(target) + "*"):
        pid = _partial_pid(target, path)
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            old = path / "old"
            if old.is_dir() and not os.path.lexists(target):
                try:
                    os.rename(old, target)
                except OSError:
                    pass
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    # leftovers of adainfer <= 0.1's staging (`.<name>.old-<pid>-*`)
    for path in target.parent.glob(f".{target.name}.old-*"):
        try:
            pid = int(path.name[len(target.name) + len(".old-") + 1:].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            if (path / "bundle").is_dir() and not os.path.lexists(target):
                with contextlib.suppress(OSError):
                    os.rename(path / "bundle", target)
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ swapping

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call (Linux >= 3.15); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_in(new: Path, target: Path, work: Path) -> None:
    """Put directory `new` at `target`; the old target (if any) ends up inside `work`."""
    checkpoint("rename")
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        pass  # `new` now holds the old target, and is removed with `work`
    else:
        os.rename(target, work / "old")
        checkpoint("rename_half")
        os.rename(new, target)
    checkpoint("renamed")


def real_target(target: Path) -> Path:
    """The path a write to `target` must replace: a symbolic link at `target` is followed (to the
    end of a chain), so the directory or file it points to is updated and the link stays a link."""
    target = Path(target).absolute()
    if target.is_symlink():
        return Path(os.path.realpath(target))
    return target


def _work_dir(target: Path, error: Error) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target)
        return Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(target)}{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise error(f"cannot write {target}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------ directories


def check_target(target: Path, force: bool, error: Error = AdainferError) -> None:
    """Refuse to replace an existing path unless `force`, and never replace a file with a directory."""
    target = Path(target)
    if os.path.lexists(target) and not target.is_dir():
        raise error(f"output path exists and is not a directory: {target}")
    if target.exists() and not force:
        raise error(f"output directory already exists: {target} (pass --force to replace it)")


@contextlib.contextmanager
def staged_directory(target: Path, force: bool = False, error: Error = AdainferError) -> Iterator[Path]:
    """Yield an empty directory; on success it replaces `target`, on any failure it is removed."""
    target = real_target(target)
    check_target(target, force, error)
    work = _work_dir(target, error)
    new = work / "new"
    try:
        try:
            new.mkdir()
        except OSError as exc:
            raise error(f"cannot write {target}: {exc.strerror or exc}") from None
        try:
            yield new
            check_target(target, force, error)
            _swap_in(new, target, work)
        except OSError as exc:
            raise error(f"writing {target} failed: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


class DirectoryUpdate:
    """The pending change of a `staged_update`: write new or replacement files under `dir`."""

    def __init__(self, live: Path, overlay: Path):
        self.live = live
        self.dir = overlay
        self.removed: set[str] = set()

    def path(self, name: str) -> Path:
        """Where to write file `name` (relative, inside the directory); parents are created."""
        _check_inside(name)
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def remove(self, name: str) -> None:
        """Leave file `name` out of the updated directory."""
        _check_inside(name)
        self.removed.add(str(PurePosixPath(name)))


def _check_inside(name: str) -> None:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValueError(f"not a relative path inside the directory: {name!r}")


@contextlib.contextmanager
def staged_update(target: Path, error: Error = AdainferError) -> Iterator[DirectoryUpdate]:
    """Change an existing directory atomically: add, replace or remove files as one step.

        with staged_update(bundle) as update:
            write_classifier(update.path("classifier.onnx"))
            new_manifest.save(update.dir)

    New files go to `update.dir` (empty at first; read the current files from `target`).
    On success a new directory is assembled from hard links of the unchanged files and the
    new ones, and swapped in; on any failure nothing changes. The live files are never
    opened for writing, so readers of the old directory are not disturbed.
    """
    target = real_target(target)
    if not target.is_dir():
        raise error(f"directory not found: {target}")
    work = _work_dir(target, error)
    try:
        overlay = work / "overlay"
        overlay.mkdir()
        update = DirectoryUpdate(target, overlay)
        try:
            yield update
            assembled = work / "new"
            _assemble(target, overlay, update.removed, assembled)
            if not target.is_dir():
                raise error(f"{target} disappeared during the update")
            _swap_in(assembled, target, work)
        except OSError as exc:
            raise error(f"updating {target} failed: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _assemble(live: Path, overlay: Path, removed: set[str], out: Path) -> None:
    os.mkdir(out)
    shutil.copymode(live, out)
    for root, dirs, files in os.walk(live):
        rel_root = Path(root).relative_to(live)
        for d in dirs:
            if not (Path(root) / d).is_symlink():
                (out / rel_root / d).mkdir(exist_ok=True)
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            rel = (rel_root / name).as_posix()
            if rel in removed or os.path.lexists(overlay / rel):
                continue
            src, dst = Path(root) / name, out / rel
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    for root, dirs, files in os.walk(overlay):
        rel_root = Path(root).relative_to(overlay)
        (out / rel_root).mkdir(exist_ok=True)
        for name in files:
            os.replace(Path(root) / name, out / rel_root / name)


# ------------------------------------------------------------------ single files


@contextlib.contextmanager
def staged_file(target: Path, error: Error = AdainferError) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = real_target(target)
    try:
        remove_stale(target)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_partial_prefix(target)}{os.getpid()}-", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise error(f"cannot write {target}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        try:
            if target.exists():
                shutil.copymode(target, tmp)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private
            yield tmp
            checkpoint("rename_file")
            os.replace(tmp, target)
        except OSError as exc:
            raise error(f"writing {target} failed: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(target: Path, data: bytes, error: Error = AdainferError) -> None:
    """Replace `target` with `data` (flushed to disk first): readers see the old or the new file."""
    with staged_file(target, error) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(target: Path, text: str, error: Error = AdainferError) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), error)


def atomic_copy(src: Union[str, Path], target: Path, error: Error = AdainferError) -> None:
    """Copy `src` to `target` so that `target` is never seen half-copied."""
    with staged_file(target, error) as tmp:
        shutil.copyfile(src, tmp)
