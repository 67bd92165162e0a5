"""The exporter: Hugging Face causal LM -> bundle of per-block ONNX graphs (needs torch, transformers)."""

from .writer import export, export_model, load_model
from .families import supported_model_types

__all__ = ["export", "export_model", "load_model", "supported_model_types"]
