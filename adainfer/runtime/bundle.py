"""Open a bundle directory: read its manifest and check every file it vouches for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError
from ..manifest import Manifest, sha256_of


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.root / name

    def graph_path(self, graph: str) -> Path:
        return self.root / self.manifest.graphs[graph].file

    @property
    def tokenizer_path(self) -> Path | None:
        spec = self.manifest.files.get("tokenizer")
        return self.root / spec.file if spec else None


def open_bundle(root: Path, check_digests: bool = True) -> Bundle:
    """Read and validate a bundle; `check_digests=False` checks sizes only (fast start on trusted media)."""
    root = Path(root)
    manifest = Manifest.load(root)
    resolved_root = root.resolve()
    for key, spec in manifest.all_files().items():
        path = root / spec.file
        if not path.exists():
            raise BundleError(f"bundle {root}: missing file {spec.file}")
        try:
            path.resolve().relative_to(resolved_root)
        except ValueError:
            raise BundleError(f"bundle {root}: {spec.file} points outside the bundle") from None
        if not path.is_file():
            raise BundleError(f"bundle {root}: {spec.file} is not a file")
        if path.stat().st_size != spec.size:
            raise BundleError(f"bundle {root}: {spec.file} has {path.stat().st_size} bytes, the manifest says {spec.size} (corrupt or modified)")
        if check_digests and sha256_of(path) != spec.sha256:
            raise BundleError(f"bundle {root}: sha256 of {spec.file} does not match the manifest (corrupt or modified)")
    return Bundle(root=root, manifest=manifest)
