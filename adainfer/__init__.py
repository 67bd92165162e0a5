"""adainfer: early exit for decoder LLMs, exported as per-block ONNX graphs.

Importing the top-level package stays light: the runtime (numpy, onnxruntime,
tokenizers) never pulls in torch or transformers; the exporter does, on demand.
"""

__version__ = "0.1.0"
