"""Atomic writes: an export killed (SIGKILL) or interrupted (Ctrl-C) at any point leaves the old
complete bundle or none at the target, and the next write removes what the dead process left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import adainfer.runtime as rt
from adainfer import atomic
from adainfer.errors import AdainferError, BundleError
from adainfer.manifest import MANIFEST_NAME, Manifest, check_manifest_digest, manifest_digest
from conftest import STORIES_DIR

PARTIAL = atomic.PARTIAL


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}{PARTIAL}"))


def _default_sigint() -> None:
    """In the child before exec: a pytest started in the background (`pytest &`) ignores SIGINT, and an
    ignored SIGINT is inherited and kept by Python, so the Ctrl-C below would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _export_process(target: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adainfer.exporter.cli", str(STORIES_DIR), "-o", str(target),
                             "--force", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, preexec_fn=_default_sigint)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# kill point -> what the target holds afterwards ("old": the previous bundle, "new": a complete new one)
KILLS = {"block_02": "old", "rename": "old"}


def test_killed_and_interrupted_exports_leave_old_or_nothing(stories_bundle, tmp_path):
    """Real `adainfer-export` processes (--no-verify, to keep the test fast) killed with SIGKILL
    after a few blocks and right at the final rename, one on a fresh target, one interrupted."""
    from adainfer.exporter import export

    old_digest = manifest_digest(stories_bundle)
    targets, procs = {}, {}
    for point in KILLS:  # all at once: each pays the interpreter and torch start-up in parallel
        target = tmp_path / point / "bundle"
        target.parent.mkdir()
        shutil.copytree(stories_bundle, target)
        (target / "old-marker").write_text("the bundle before this export")
        targets[point] = target
        procs[point] = _export_process(target, {atomic.KILL_ENV: point})
    fresh = tmp_path / "fresh" / "bundle"  # no previous bundle: a kill leaves nothing at all
    procs["fresh"] = _export_process(fresh, {atomic.KILL_ENV: "block_02"})
    interrupted = tmp_path / "interrupted" / "bundle"
    interrupted.parent.mkdir()
    shutil.copytree(stories_bundle, interrupted)
    (interrupted / "old-marker").write_text("the bundle before this export")
    procs["sigint"] = _export_process(interrupted, {atomic.PAUSE_ENV: "block_01"})

    # Ctrl-C while the exporter is in the middle of writing graphs
    line = procs["sigint"].stdout.readline()
    assert line.strip() == "paused at block_01", line
    assert _leftovers(interrupted)  # it really was writing beside the target
    procs["sigint"].send_signal(signal.SIGINT)
    out, err = procs["sigint"].communicate(timeout=120)
    assert procs["sigint"].returncode == 130, err
    assert [l for l in err.splitlines() if l.strip()] == ["adainfer-export: interrupted"]
    assert _leftovers(interrupted) == []  # cleaned up on the way out
    assert (interrupted / "old-marker").exists() and manifest_digest(interrupted) == old_digest

    for point, proc in procs.items():
        if point != "sigint":
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, err)

    assert not os.path.lexists(fresh)
    assert _leftovers(fresh)  # the dead process's temporary directory ...
    for point, expected in KILLS.items():
        target = targets[point]
        assert _leftovers(target), point  # ... is still there after a SIGKILL
        rt.load(target)  # a complete bundle either way: every file checks against the manifest
        assert (target / "old-marker").exists() == (expected == "old"), point

    # the next export to the same target removes the dead process's leftovers
    for target in [fresh, *targets.values()]:
        export(STORIES_DIR, target, force=True, verify=False, progress=False)
        assert _leftovers(target) == [], target
        assert not (target / "old-marker").exists()
        rt.load(target)


WRITER = """
import os, sys
from pathlib import Path
from adainfer import atomic
if os.environ.get("NO_EXCHANGE"):
    atomic._exchange = lambda a, b: False
with atomic.staged_directory(Path(sys.argv[1]), force=True) as tmp:
    for i in range(3):
        (tmp / f"part{i}").write_text("new")
        atomic.checkpoint(f"part{i}")
"""


@pytest.mark.parametrize("point, exchange, expected", [
    ("part1", True, "old"), ("rename", True, "old"), ("renamed", True, "new"),
    ("rename", False, "old"), ("rename_half", False, "old"), ("renamed", False, "new"),
])
def test_staged_directory_killed_at_every_step(point, exchange, expected, tmp_path):
    """The same protocol without torch's start-up: every step of the swap, with renameat2's
    exchange and with the two-rename fallback (where a kill in between leaves no target until
    the next write puts the old directory back)."""
    target = tmp_path / "d"
    target.mkdir()
    (target / "part0").write_text("old")
    env = {**os.environ, atomic.KILL_ENV: point, **({} if exchange else {"NO_EXCHANGE": "1"})}
    proc = subprocess.run([sys.executable, "-c", WRITER, str(target)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if point == "rename_half":
        assert not os.path.lexists(target)
    else:
        assert (target / "part0").read_text() == expected
        assert (target / "part2").exists() == (expected == "new")
    assert _leftovers(target)
    atomic.remove_stale(target)  # what the next write does first
    assert (target / "part0").read_text() == expected
    assert _leftovers(target) == []


def test_swap_interrupted_between_renames_restores_old_directory(tmp_path):
    """Where the two-rename fallback swap (no renameat2) was killed in between, the next write puts
    the old directory back before anything else."""
    target = tmp_path / "bundle"
    work = tmp_path / f".bundle{PARTIAL}{_dead_pid()}-abc"
    (work / "old").mkdir(parents=True)
    (work / "old" / MANIFEST_NAME).write_text("{}")
    (work / "new").mkdir()
    atomic.remove_stale(target)
    assert (target / MANIFEST_NAME).read_text() == "{}"
    assert not work.exists()


def test_staged_directory_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "d"
    target.mkdir()
    (target / "a").write_text("old")
    with atomic.staged_directory(target, force=True) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert _leftovers(target) == []


def test_live_leftovers_are_not_touched(tmp_path):
    target = tmp_path / "bundle"
    live = tmp_path / f".bundle{PARTIAL}{os.getppid()}-xyz"  # a process that is still running
    live.mkdir()
    atomic.remove_stale(target)
    assert live.exists()


def test_staged_file_replaces_or_keeps(tmp_path):
    target = tmp_path / "f.txt"
    atomic.atomic_write_text(target, "one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic.staged_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "one"
    atomic.atomic_copy(target, tmp_path / "g.txt")
    assert (tmp_path / "g.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "g.txt"]


def test_staged_file_in_missing_directory_is_a_clean_error(tmp_path):
    with pytest.raises(AdainferError, match="cannot write"):
        atomic.atomic_write_text(tmp_path / "missing" / "f.txt", "x")


def test_staged_update_adds_files_and_manifest_atomically(stories_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(stories_bundle, bundle)
    (bundle / "stray.txt").write_text("not listed in the manifest")
    digest = manifest_digest(bundle)
    tokenizer_inode = (bundle / "tokenizer.json").stat().st_ino

    # a failure half-way changes nothing
    with pytest.raises(RuntimeError):
        with atomic.staged_update(bundle, BundleError) as update:
            update.path("exit_policy.json").write_text("{}")
            raise RuntimeError("calibration crashed")
    assert not (bundle / "exit_policy.json").exists() and _leftovers(bundle) == []

    with atomic.staged_update(bundle, BundleError) as update:
        update.path("exit_policy.json").write_text('{"threshold": 0.5}')
        update.remove("stray.txt")
        manifest = Manifest.load(bundle).attach("exit_policy", update.dir, "exit_policy.json")
        manifest.save(update.dir)
        assert not (bundle / "exit_policy.json").exists()  # nothing visible before the end
    assert (bundle / "exit_policy.json").read_text() == '{"threshold": 0.5}'
    assert not (bundle / "stray.txt").exists()
    assert (bundle / "tokenizer.json").stat().st_ino == tokenizer_inode  # unchanged files are linked, not copied
    assert _leftovers(bundle) == []
    loaded = rt.load(bundle)  # the attachment is checked like every other file
    assert loaded.manifest.attachments["exit_policy"].file == "exit_policy.json"
    # attaching files does not change the digest that engines and classifiers record
    assert manifest_digest(bundle) == digest
    check_manifest_digest(bundle, digest, "classifier.onnx")
    (bundle / "exit_policy.json").write_text('{"threshold": 0.9}')
    with pytest.raises(BundleError, match="exit_policy.json"):
        rt.load(bundle)


def test_manifest_digest_ties_builds_to_their_bundle(stories_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(stories_bundle, bundle)
    recorded = manifest_digest(bundle)
    manifest = Manifest.load(bundle)
    changed = Manifest.from_dict({**manifest.to_dict(), "eos_token_ids": [2]})
    atomic.atomic_write_text(bundle / MANIFEST_NAME, changed.to_json())
    assert manifest_digest(bundle) != recorded
    with pytest.raises(BundleError, match="engine block_00.plan was built from another bundle"):
        check_manifest_digest(bundle, recorded, "engine block_00.plan")


def test_manifest_save_refuses_an_invalid_manifest(stories_bundle, tmp_path):
    import dataclasses

    manifest = Manifest.load(stories_bundle)
    bad = dataclasses.replace(manifest, num_kv_heads=3)
    with pytest.raises(BundleError, match="not a multiple"):
        bad.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_writes_through_a_symlinked_bundle_path_keep_the_link(stories_bundle, tmp_path):
    """`ln -s real link; adainfer calib link` / `adainfer-export -o link --force` update `real`, and
    `link` stays a link to it (a staged write used to replace the link with a plain directory)."""
    real = tmp_path / "real"
    shutil.copytree(stories_bundle, real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic.staged_update(link, BundleError) as update:  # what calibration does
        update.path("note.txt").write_text("added through the link")
        Manifest.load(link).attach("note", update.dir, "note.txt").save(update.dir)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "note.txt").read_text() == "added through the link"
    assert rt.load(link).manifest.attachments["note"].file == "note.txt"
    with atomic.staged_directory(link, force=True) as tmp:  # what an export does
        (tmp / "manifest.json").write_text("{}")
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == ["manifest.json"]
    atomic.atomic_write_text(link / "manifest.json", "[]")  # a single file through the link
    assert (real / "manifest.json").read_text() == "[]"
    file_link = tmp_path / "file-link.txt"
    file_link.symlink_to(real / "manifest.json")
    atomic.atomic_write_text(file_link, "{}")
    assert file_link.is_symlink() and (real / "manifest.json").read_text() == "{}"
    assert _leftovers(real) == [] and _leftovers(link) == []


def test_export_force_through_a_symlink_keeps_the_link(stories_bundle, tmp_path, capsys):
    from adainfer.exporter.cli import main

    real = tmp_path / "real"
    shutil.copytree(stories_bundle, real)
    (real / "old-marker").write_text("the bundle before")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main([str(STORIES_DIR), "-o", str(link), "--force", "--quiet", "--no-verify", "--no-calib"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert not (real / "old-marker").exists() and rt.load(real).manifest.num_layers == 5
