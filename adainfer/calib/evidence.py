"""The evidence rule: a calibrated exit must *show* its target agreement on held-out data.

Held-out agreement is a proportion measured on n positions (prompts, for classification), so
its point estimate is noisy: two short documents gave 1.0 where the truth was 0.76. The rule:

    a threshold qualifies only if the one-sided 95% Clopper-Pearson lower confidence bound of its
    held-out agreement (k agreeing positions of n) reaches the target agreement.

Never exiting agrees everywhere (k = n), whose bound is 0.05 ** (1 / n); if even that is below
the target the held-out data cannot support the target at all, and the calibration is refused
before anything is trained or written (at 0.99: at least 299 held-out positions). A target of
exactly 1.0 cannot be reached by any bound: it qualifies a threshold only if every held-out
position agrees, and needs the evidence 0.99 needs. Positions of one document are correlated, so
the bound is optimistic for text; it is a floor on the evidence, not a guarantee.
"""

from __future__ import annotations

import math

from ..errors import InputError

CONFIDENCE = 0.95
#: the target whose evidence a target of 1.0 must have (no bound ever reaches 1.0)
EXACT_TARGET_EVIDENCE = 0.99


def agreement_lower_bound(agree: int, total: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound of a binomial proportion agree / total."""
    if total <= 0:
        return 0.0
    if agree <= 0:
        return 0.0
    if agree >= total:
        return (1.0 - confidence) ** (1.0 / total)
    from scipy.stats import beta

    return float(beta.ppf(1.0 - confidence, agree, total - agree + 1))


def positions_needed(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest held-out positions on which perfect agreement shows `target` (ceil(log(1-c) / log(target)))."""
    target = min(target, EXACT_TARGET_EVIDENCE)
    return max(1, math.ceil(math.log(1.0 - confidence) / math.log(target) - 1e-9))


def meets_target(agreement: float, total: int, target: float, confidence: float = CONFIDENCE) -> bool:
    """Whether a held-out agreement measured on `total` positions shows `target` (the rule above)."""
    agree = int(round(agreement * total))
    if target >= 1.0:
        return agree == total and total >= positions_needed(target, confidence)
    return agreement_lower_bound(agree, total, confidence) >= target


def check_evidence(held_out: int, target: float, confidence: float = CONFIDENCE) -> None:
    """Refuse a calibration whose held-out part is too small to show `target` even without exiting."""
    need = positions_needed(target, confidence)
    if held_out < need:
        raise InputError(f"held-out evidence too small: {held_out} held-out positions cannot show agreement >= {target:g} "
                         f"at {confidence:.0%} confidence (at least {need} are needed: more or longer documents, "
                         f"a larger --holdout, or a lower --target-agreement); the bundle was not changed")


def paired_difference(correct_a, correct_b, confidence: float = CONFIDENCE) -> dict:
    """Accuracy of A minus accuracy of B on the same rows, with its noise: only the rows where the two disagree
    carry information (McNemar), so it reports them (`only_a`: A right and B wrong; `only_b`: the reverse) and
    what `paired_counts` makes of them."""
    import numpy as np

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two equal-length non-empty rows of outcomes, got {a.shape} and {b.shape}")
    return paired_counts(int((a & ~b).sum()), int((~a & b).sum()), int(a.size), confidence)


def paired_counts(only_a: int, only_b: int, rows: int, confidence: float = CONFIDENCE) -> dict:
    """From the discordant counts alone (so comparisons on disjoint row sets, e.g. two tasks, pool by adding them):
    the difference in points, its two-sided Wald interval for paired proportions (100 * ((b - c) / n ± z * sqrt(b +
    c - (b - c)^2 / n) / n)) and the exact McNemar p-value (binomial test of b of b + c at 1/2)."""
    from scipy.stats import binomtest, norm

    if rows <= 0 or only_a < 0 or only_b < 0 or only_a + only_b > rows:
        raise ValueError(f"paired_counts: {only_a} + {only_b} discordant rows do not fit in {rows} rows")
    diff = (only_a - only_b) / rows
    half = float(norm.ppf(0.5 + confidence / 2)) * math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / rows, 0.0)) / rows
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"rows": rows, "only_a": only_a, "only_b": only_b, "difference_points": 100 * diff,
            "interval_points": [100 * (diff - half), 100 * (diff + half)], "confidence": confidence, "mcnemar_p": p}


def within_margin(paired: dict, margin_points: float = 1.0) -> str:
    """Whether B loses at most `margin_points` against A (paired = paired_difference(A, B)): "yes" when the whole
    interval of A - B lies at or below the margin, "no" when the whole interval lies above it, else "undecided"."""
    low, high = paired["interval_points"]
    if high <= margin_points:
        return "yes"
    if low > margin_points:
        return "no"
    return "undecided"
