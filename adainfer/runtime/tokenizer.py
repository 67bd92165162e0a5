"""The bundle's tokenizer (Hugging Face `tokenizers`, no transformers), with streaming decode."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ..errors import BundleError


class TextTokenizer:
    def __init__(self, path: Path):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise BundleError(f"cannot read tokenizer {path}: {str(exc).splitlines()[0]}") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids with the model's special tokens (e.g. `<s>`) as its tokenizer adds them
        (`add_special_tokens=False`: none added, for text that already has them, e.g. a chat prompt)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_id(self, token: str):
        """The id of one token of the vocabulary (e.g. `<|im_end|>`), or None."""
        return self._tok.token_to_id(token)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of ids into text increments, holding back incomplete UTF-8 bytes."""

    def __init__(self, tokenizer: TextTokenizer, prefix: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prefix)
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def start(self) -> str:
        self.emitted = self.tokenizer.decode(self.ids)
        return self.emitted

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece
