"""Range checks of calibration and evaluation options, shared by the commands and the Python API.

Each failure is one `InputError` naming the command-line option (the API's keyword is the same
word), raised before any data is read or any file written.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

from ..errors import InputError


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(option: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        raise InputError(f"{option} must be an integer >= {minimum}, got {value!r}")


def check_fraction(option: str, value: Any) -> None:
    """A number strictly between 0 and 1 (NaN and the ends refused)."""
    if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
            or not 0.0 < value < 1.0):
        raise InputError(f"{option} must be a number in (0, 1), got {value!r}")


def check_data_options(shots: Any = 0, limit: Any = None, skip: Any = 0, max_positions_per_doc: Any = None,
                       seed: Any = 0) -> None:
    """What `--data` is read with (calib and eval)."""
    check_int("--shots", shots, 0)
    check_int("--limit", limit, 1, optional=True)
    check_int("--skip", skip, 0)
    check_int("--max-positions-per-doc", max_positions_per_doc, 1, optional=True)
    check_int("--seed", seed, 0)


def check_calib_options(target: Any, holdout: Any, rank: Any, hidden_size: Optional[int] = None, **data) -> None:
    """`adainfer calib` / `calibrate()`: target agreement in (0, 1], held-out fraction in (0, 1),
    low-rank rank in 1..hidden size (None: the default), and the data options."""
    if (not isinstance(target, numbers.Real) or isinstance(target, bool) or not math.isfinite(target)
            or not 0.0 < target <= 1.0):
        raise InputError(f"--target-agreement must be in (0, 1], got {target!r}")
    check_fraction("--holdout", holdout)
    check_int("--rank", rank, 1, optional=True)
    if rank is not None and hidden_size is not None and rank > hidden_size:
        raise InputError(f"--rank {rank} is more than the hidden size ({hidden_size})")
    check_data_options(**data)


def check_eval_options(timing_samples: Any = 0, new_tokens: Any = 1, **data) -> None:
    """`adainfer eval` / `evaluate()`."""
    check_int("--timing-samples", timing_samples, 0)
    check_int("--new-tokens", new_tokens, 1)
    check_data_options(**data)
