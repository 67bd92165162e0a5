"""The arguments every decode-timing tool here shares (one argument group, as Polygraphy's subtools share theirs)."""

from __future__ import annotations

import argparse
from typing import Optional


def add_decode_args(p: argparse.ArgumentParser, repeats: Optional[int] = 3, prompt_tokens: bool = True) -> None:
    """--threads (2), --tokens (64 decoded), --prompt-tokens (16; unless `prompt_tokens` is False) and --repeats
    (interleaved; `repeats` is its default, None for tools that time once)."""
    g = p.add_argument_group("decode timing")
    g.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    g.add_argument("--tokens", type=int, default=64, help="greedy tokens decoded and timed (default 64)")
    if prompt_tokens:
        g.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    if repeats is not None:
        g.add_argument("--repeats", type=int, default=repeats, help=f"interleaved timed repeats (default {repeats})")
