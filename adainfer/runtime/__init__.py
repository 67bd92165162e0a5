"""The light runtime: numpy + onnxruntime + tokenizers. Never imports torch or transformers.

    >>> import adainfer.runtime as rt
    >>> model = rt.load("bundles/stories260K")                 # backend="cpu"; see runtime/backends
    >>> model.generate("Once upon a time", max_new_tokens=20).text
    >>> rt.chat(model, "What is the capital of France?").text   # bundles with a chat template
"""

from .backends import BACKENDS, load
from .bundle import Bundle, open_bundle
from .conversation import chat
from .model import DecodeState, Generation, Model, StreamEvent

__all__ = ["BACKENDS", "Bundle", "chat", "DecodeState", "Generation", "Model", "StreamEvent", "load", "open_bundle"]
