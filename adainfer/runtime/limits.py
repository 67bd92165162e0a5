"""Input limits of a generation request: options in range, prompts that fit the model's positions."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Optional, Sequence

from ..errors import InputError

TRUNCATE_SIDES = (None, "left")
MODES = ("full", "early-exit", "speculative")
#: a prefill whose attention scores (batch x heads x sequence x context x 4 bytes) exceed this
#: fraction of the machine's memory is refused before it runs (ONNX Runtime would fail, or swap)
MEMORY_FRACTION = 0.5


def _is_int(value: Any) -> bool:
    # a plain int first: the ABC check costs microseconds per decoded token after a graph run evicts the caches
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


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


def machine_threads() -> int:
    """The most intra-op threads a session may ask for: 4 per core this process may run on (more only
    oversubscribes; ONNX Runtime starts every one of them, 100000 took minutes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 4 * max(1, cores)


def check_threads(threads: Any) -> None:
    if threads is not None and (not _is_int(threads) or threads < 0):
        raise InputError(f"threads must be a non-negative integer (0 = ONNX Runtime's default), got {threads!r}")
    if threads is not None and threads > machine_threads():
        raise InputError(f"threads must be at most {machine_threads()} on this machine (4 per core), got {threads}")


def check_decoding(mode: Any, max_draft: Any) -> None:
    """Refuse an unknown generation mode or a speculative draft length below 1."""
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose {', '.join(MODES)}")
    if not _is_int(max_draft) or max_draft < 1:
        raise InputError(f"max_draft must be an integer >= 1, got {max_draft!r}")


def check_text(text: str) -> None:
    """Text that cannot be encoded as UTF-8 (lone surrogates: invalid bytes on the command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"the prompt is not valid UTF-8 (character {exc.start}); pass text or token ids") from None


def prompt_batch(prompts: Any) -> list:
    """A batch of token-id prompts as a list (`InputError` for a bare number, text or other non-list)."""
    if isinstance(prompts, (str, bytes, dict)) or not hasattr(prompts, "__iter__"):
        raise InputError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    return list(prompts)


def step_ids(next_ids: Any) -> list[int]:
    """One decode step's token ids (one per row): integers only, never silently truncated floats."""
    if _is_int(next_ids):
        return [int(next_ids)]
    return token_ids(next_ids)


def check_memory(batch: int, heads: int, seq: int, context: int) -> None:
    """Refuse a forward whose attention scores alone would take more than half the machine's memory."""
    need = 4 * batch * heads * seq * context
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > MEMORY_FRACTION * total:
        raise InputError(f"not enough memory: {seq} tokens over a context of {context} need about "
                         f"{need / 2**30:.0f} GiB for attention scores, this machine has {total / 2**30:.0f} GiB")


def token_ids(ids: Any) -> list[int]:
    """A prompt given as token ids, as a list of ints (`InputError` for anything else)."""
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
        raise InputError(f"a prompt must be text or a sequence of token ids, got {type(ids).__name__}")
    shape = getattr(ids, "shape", None)
    if shape is not None and len(shape) != 1:
        raise InputError(f"token ids must be one-dimensional, got shape {tuple(shape)}")
    ids = list(ids)
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
