"""Input limits of a generation request: options in range, prompts that fit the model's positions."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

from ..errors import InputError

TRUNCATE_SIDES = (None, "left")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_options(max_new_tokens: Any, temperature: Any = 0.0, top_p: Any = 1.0, seed: Any = None) -> None:
    """Refuse sampling options out of range (one-line `InputError`)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")


def check_threads(threads: Any) -> None:
    if threads is not None and (not _is_int(threads) or threads < 0):
        raise InputError(f"threads must be a non-negative integer (0 = ONNX Runtime's default), got {threads!r}")


def token_ids(ids: Any) -> list[int]:
    """A prompt given as token ids, as a list of ints (`InputError` for anything else)."""
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
        raise InputError(f"a prompt must be text or a sequence of token ids, got {type(ids).__name__}")
    ids = list(ids.ravel() if hasattr(ids, "ravel") else ids)
    if any(not _is_int(i) for i in ids):
        bad = next(i for i in ids if not _is_int(i))
        raise InputError(f"token ids must be integers, got {bad!r}")
    return [int(i) for i in ids]


def fit_prompt(ids: list[int], max_positions: int, max_new_tokens: int, truncate: Optional[str] = None,
               bos_token_id: Optional[int] = None) -> list[int]:
    """The prompt if it leaves room for `max_new_tokens` in `max_positions`; else an `InputError`, or
    with `truncate="left"` its most recent tokens (after the leading BOS token, which is kept)."""
    if truncate not in TRUNCATE_SIDES:
        raise InputError(f"truncate must be None or 'left', got {truncate!r}")
    if not ids:
        raise InputError("empty prompt")
    new = max_new_tokens if _is_int(max_new_tokens) and max_new_tokens > 0 else 0
    room = max_positions - new
    if len(ids) <= room:
        return ids
    if truncate is None:
        if len(ids) > max_positions:
            raise InputError(f"prompt has {len(ids)} tokens, more than the model's {max_positions} positions "
                             f"(--truncate-prompt / truncate='left' keeps the most recent)")
        raise InputError(f"prompt of {len(ids)} tokens plus {new} new tokens exceeds the model's {max_positions} "
                         f"positions (--truncate-prompt / truncate='left' keeps the most recent)")
    keep_bos = bos_token_id is not None and ids[0] == bos_token_id
    if room < 1 + keep_bos:
        raise InputError(f"{new} new tokens leave no room for the prompt in the model's {max_positions} positions")
    return ids[:1] + ids[len(ids) - room + 1:] if keep_bos else ids[len(ids) - room:]
