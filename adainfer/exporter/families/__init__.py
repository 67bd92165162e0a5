"""The table of supported families: `model_type` -> adapter. Add a family here and nowhere else."""

from __future__ import annotations

from ...errors import UnsupportedModelError
from .base import FamilyAdapter, Geometry
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .opt import OPTAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (LlamaAdapter, GPT2Adapter, OPTAdapter)
BY_MODEL_TYPE: dict[str, type[FamilyAdapter]] = {t: a for a in ADAPTERS for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(BY_MODEL_TYPE)


def adapter_class_for(model_type: str) -> type[FamilyAdapter]:
    try:
        return BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
        ) from None


def adapter_for(model) -> FamilyAdapter:
    return adapter_class_for(model.config.model_type)(model)


__all__ = ["ADAPTERS", "FamilyAdapter", "Geometry", "adapter_class_for", "adapter_for", "supported_model_types"]
