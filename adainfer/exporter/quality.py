"""Is a converted (fp16 / int8 / int4) bundle still the same model? Judged as a user would judge it.

A quantized bundle never reproduces float32 logits to a fixed tolerance, and on a real model the
absolute logit error says little (SmolLM2-135M int8: chain logits 12.6 apart, same answers). What a
user cares about is whether the bundle predicts the same next tokens and how well it models text.
So the export runs the converted chain over held-out text (teacher forcing, every position) and
compares it with the float32 model:

- **top-1 agreement**: the share of positions whose arg-max token equals float32's;
- **perplexity ratio**: the bundle's perplexity on the text ÷ float32's.

Both must meet the precision's stated threshold (`THRESHOLDS`), or the export is refused.

The text is `adainfer/data/tinystories_heldout.txt` (never used for calibration), tokenized with
the bundle's own tokenizer; a bundle without a tokenizer (random-weight test models) is fed seeded
random token ids instead, which the record says. The float32 reference is the `transformers`
model itself (the float32 chain equals it within 1e-4, checked before any conversion).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ExportError
from ..paths import HELDOUT_TEXT

#: per precision: (lowest top-1 agreement with float32, highest perplexity ÷ float32's) on held-out text.
#: Set below what a correct conversion reaches and far above what a broken one does. Measured (8 held-out
#: stories, 1,016 positions): stories260K fp16 1.000 / 1.000, int8-weight 0.991 / 1.001, int8-dynamic
#: 0.886 (blocks) and 0.873 (heads too), int4 0.865 / 1.09 (blocks) and 0.842 (heads too); SmolLM2 int8-weight 0.966;
#: SmolLM2-135M-Instruct (from its Q4_1 GGUF) int4 with the GGUF's grid kept (`gguf_grid.py`) 0.973 / 1.002,
#: int4 rounded again (as onnxruntime-genai does) 0.63 / 1.32: refused (docs/quantization.md).
THRESHOLDS = {
    "fp32": (0.999, 1.001),
    "fp16": (0.99, 1.01),
    "int8-weight": (0.95, 1.03),
    "int8-dynamic": (0.85, 1.10),
    "int4": (0.80, 1.20),
    # float32 blocks with 8- / 4-bit LM heads (`--precision fp32 --head-bits N`): SmolLM2 (Q8_0 head kept exactly,
    # int8 activations) 0.989 / 1.001; a 4-bit head 0.836 / 1.054 (docs/bench/speed-profile.md)
    "fp32-head8": (0.95, 1.03),
    "fp32-head4": (0.80, 1.20),
}
#: how much text the check reads: stories, tokens per story at most
STORIES = 8
MAX_TOKENS = 128
SEED = 0


@dataclass(frozen=True)
class Sequences:
    """Token-id sequences the check reads, and where they came from."""

    ids: list[list[int]]
    source: str  # "tinystories_heldout.txt" or "random ids (no tokenizer)"


@dataclass(frozen=True)
class Reference:
    """Float32's top-1 token at every position (but the last) of each sequence, and its perplexity."""

    top1: list[np.ndarray]
    perplexity: float


def held_out_sequences(tokenizer_file: Optional[Path], vocab_size: int, bos_token_id: Optional[int] = None,
                       text: Path = HELDOUT_TEXT, stories: int = STORIES, max_tokens: int = MAX_TOKENS) -> Sequences:
    """The first `stories` held-out stories, tokenized (BOS first when the model has one), cut to `max_tokens`."""
    if tokenizer_file is None or not Path(tokenizer_file).is_file():
        rng = np.random.default_rng(SEED)
        ids = [rng.integers(min(3, vocab_size - 1), vocab_size, size=max_tokens).tolist() for _ in range(stories)]
        return Sequences(ids, "random ids (no tokenizer)")
    texts = [t.strip() for t in text.read_text(encoding="utf-8").split("<|endoftext|>") if t.strip()][:stories]
    return text_sequences(texts, tokenizer_file, vocab_size, bos_token_id, max_tokens, text.name)


def text_sequences(texts: list[str], tokenizer_file: Path, vocab_size: int, bos_token_id: Optional[int],
                   max_tokens: int, source: str) -> Sequences:
    """`texts` tokenized with the bundle's tokenizer (BOS first when the model has one), cut to `max_tokens`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    out = []
    for story in texts:
        ids = tokenizer.encode(story).ids
        if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
            ids = [bos_token_id] + ids
        out.append([i for i in ids if 0 <= i < vocab_size][:max_tokens])
    return Sequences(out, source)


def _nll_and_top1(logits: np.ndarray, ids: list[int]) -> tuple[float, np.ndarray]:
    """Summed negative log-likelihood of ids[1:] under logits[:-1], and the arg-max at each of those positions."""
    logits = np.asarray(logits[:-1], dtype=np.float64)
    targets = np.asarray(ids[1:])
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted[np.arange(len(targets)), targets] - np.log(np.exp(shifted).sum(-1))
    return -float(logp.sum()), logits.argmax(-1)


def _summarize(per_sequence: list[tuple[float, np.ndarray]]) -> tuple[float, list[np.ndarray]]:
    nll = sum(n for n, _ in per_sequence)
    count = sum(len(t) for _, t in per_sequence)
    return float(np.exp(nll / max(1, count))), [t for _, t in per_sequence]


def torch_reference(model, sequences: Sequences) -> Reference:
    """Float32's answers from the `transformers` model."""
    import torch

    rows = []
    with torch.no_grad():
        for ids in sequences.ids:
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            rows.append(_nll_and_top1(logits, ids))
    perplexity, top1 = _summarize(rows)
    return Reference(top1, perplexity)


def all_position_logits(model, ids: list[int]) -> np.ndarray:
    """Logits (positions, vocab) of one sequence through a loaded runtime bundle (teacher forcing)."""
    input_ids = np.asarray([ids], dtype=np.int64)
    state = model.new_state(1)
    run = model.run_layers(input_ids, state)
    return model.final_logits(run.hidden[0])


def measure(bundle_dir: Path, sequences: Sequences, reference: Reference, threads: Optional[int] = None) -> dict:
    """Top-1 agreement with `reference` and perplexity of the bundle on `sequences`."""
    from ..runtime import load

    model = load(bundle_dir, check_digests=False, threads=threads)
    rows = [_nll_and_top1(all_position_logits(model, ids), ids) for ids in sequences.ids]
    perplexity, top1 = _summarize(rows)
    agree = sum(int((a == b).sum()) for a, b in zip(top1, reference.top1))
    positions = sum(len(t) for t in top1)
    return {"text": sequences.source, "positions": positions, "top1_agreement": agree / max(1, positions),
            "perplexity": perplexity, "fp32_perplexity": reference.perplexity,
            "perplexity_ratio": perplexity / reference.perplexity}


def check(precision: str, result: dict, thresholds: Optional[tuple[float, float]] = None) -> dict:
    """Refuse (ExportError) a result below the precision's thresholds; returns the result with the thresholds."""
    min_agreement, max_ratio = thresholds if thresholds is not None else THRESHOLDS[precision]
    result = {**result, "min_top1_agreement": min_agreement, "max_perplexity_ratio": max_ratio}
    if not result["top1_agreement"] >= min_agreement:  # NaN fails too
        raise ExportError(f"quality check failed: {precision} top-1 agreement with fp32 {result['top1_agreement']:.3f} "
                          f"on {result['positions']} positions of {result['text']} (required >= {min_agreement})")
    if not result["perplexity_ratio"] <= max_ratio:
        raise ExportError(f"quality check failed: {precision} perplexity {result['perplexity']:.3f} is "
                          f"{result['perplexity_ratio']:.3f}x fp32's {result['fp32_perplexity']:.3f} on {result['text']} "
                          f"(allowed {max_ratio}x)")
    return result
