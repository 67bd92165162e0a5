"""Refuse, before any export work, a tokenizer whose ids do not fit the model's vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import ExportError


def check_tokenizer_fits(path: Optional[Path], vocab_size: int) -> None:
    """A tokenizer that can produce id >= vocab_size makes the bundle refuse ordinary prompts
    (the runtime checks every id against the manifest's vocabulary): refuse it at export."""
    if path is None or not Path(path).is_file():
        return
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises its own exception type
        raise ExportError(f"{path}: not a usable tokenizer ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    size = max(vocab.values()) + 1 if vocab else 0
    if size > vocab_size:
        raise ExportError(f"{Path(path).name} has {size} tokens, more than the model's vocabulary of {vocab_size} "
                          f"(token ids 0..{vocab_size - 1}); the bundle would refuse ordinary prompts")
