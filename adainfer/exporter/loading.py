"""What transformers' `from_pretrained` did not load: refused instead of exported.

transformers catches exceptions raised while it converts a parameter (e.g. a `MemoryError`
on a loaded machine), logs them, and leaves that parameter as randomly initialised; with its
logging silenced (as the exporter does) nothing shows. `output_loading_info=True` reports
such parameters as missing; any missing or mismatched parameter, or a loading error, is
refused here, so a half-loaded model is never exported (the export's own verification
compares with that same model and could not notice).
"""

from __future__ import annotations

from ..errors import ExportError


def check_loading_info(info: dict, source) -> None:
    """Refuse a model whose parameters were not all loaded from `source` (a directory or file)."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(k[0] if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ())
    errors = [str(e).strip().splitlines()[0] for e in info.get("error_msgs") or () if str(e).strip()]
    if missing or mismatched:
        names = (missing + mismatched)[:3]
        raise ExportError(f"cannot load model from {source}: {len(missing) + len(mismatched)} parameters were not loaded "
                          f"(e.g. {', '.join(names)}): missing from the checkpoint, of another shape, or their "
                          f"conversion failed")
    if errors:
        raise ExportError(f"cannot load model from {source}: {errors[0]}")
