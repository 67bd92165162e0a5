"""The whole model as one ONNX graph with KV cache (`model.onnx`): the baseline a bundle is measured against.

Built from the same family adapter modules as the per-block bundle (embedding, every block,
final head chained in one torch module), so it is the same math in one graph:

inputs  `input_ids, position_ids (batch, sequence), attention_mask (batch, total_length),
         past_key_NN, past_value_NN (batch, kv_heads, past_length, head_dim)`
outputs `logits (batch, vocab)` of the last position, `present_key_NN, present_value_NN`.

It is verified against `transformers` (a prefill and a cached decode step) before the
bundle is renamed into place, and listed in the manifest's attachments under `monolithic`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from .families import FamilyAdapter
from .graph_export import export_graph
from .graphs import GraphDef, example_block_inputs
from .verify import _close

FILE = "model.onnx"
ATTACHMENT = "monolithic"


def kv_input_names(num_layers: int) -> list[str]:
    return [f"past_{kind}_{i:02d}" for i in range(num_layers) for kind in ("key", "value")]


def kv_output_names(num_layers: int) -> list[str]:
    return [f"present_{kind}_{i:02d}" for i in range(num_layers) for kind in ("key", "value")]


class MonolithicModel(nn.Module):
    """embed -> block_00 ... block_NN -> head on the last position, KV caches in and out."""

    def __init__(self, adapter: FamilyAdapter):
        super().__init__()
        g = adapter.geometry()
        self.embed = adapter.embed()
        self.blocks = nn.ModuleList([adapter.block(i) for i in range(g.num_layers)])
        self.head = adapter.head()
        self.embed_takes_positions = adapter.embed_takes_positions

    def forward(self, input_ids, position_ids, attention_mask, *past):
        hidden = self.embed(input_ids, position_ids) if self.embed_takes_positions else self.embed(input_ids)
        presents = []
        for i, block in enumerate(self.blocks):
            hidden, key, value = block(hidden, position_ids, attention_mask, past[2 * i], past[2 * i + 1])
            presents += [key, value]
        return (self.head(hidden[:, -1, :]), *presents)


def graph_def(adapter: FamilyAdapter, seed: int = 0) -> GraphDef:
    g = adapter.geometry()
    block = example_block_inputs(g, batch=2, seq=3, past=4, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, g.vocab_size, (2, 3), generator=gen),
              "position_ids": block["position_ids"], "attention_mask": block["attention_mask"]}
    for i, name in enumerate(kv_input_names(g.num_layers)):
        inputs[name] = torch.randn(*block["past_key"].shape, generator=gen)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_length"}, "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past_length"} for n in kv_input_names(g.num_layers)})
    axes.update({n: {0: "batch", 2: "total_length"} for n in kv_output_names(g.num_layers)})
    module = MonolithicModel(adapter).eval()
    return GraphDef("model", module, inputs, ["logits", *kv_output_names(g.num_layers)], axes)


def write(adapter: FamilyAdapter, bundle_dir: Path, threshold: int) -> list[str]:
    """Export `model.onnx` (with `model.onnx.data` above `threshold` bytes of weights); returns the files written."""
    path = Path(bundle_dir) / FILE
    export_graph(graph_def(adapter), path, threshold)
    data = path.with_name(path.name + ".data")
    return [FILE] + ([data.name] if data.exists() else [])


def verify(model, path: Path, seed: int = 0, tolerance: float = 1e-4) -> None:
    """Prefill logits and one cached decode step's logits of `model.onnx` against `transformers`."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layers = sum(1 for i in session.get_inputs() if i.name.startswith("past_key_"))
    kv = session.get_inputs()[3].shape
    vocab = model.config.vocab_size
    ids = np.random.default_rng(seed).integers(3, vocab, size=7).tolist()
    empty = np.zeros((1, kv[1], 0, kv[3]), dtype=np.float32)
    feeds = {n: empty for n in kv_input_names(layers)}
    out = session.run(None, {"input_ids": np.asarray([ids[:-1]]), "position_ids": np.arange(6)[None],
                             "attention_mask": np.ones((1, 6), dtype=np.int64), **feeds})
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float().numpy()
    _close("model.onnx", "prefill logits", out[0][0], want[-2], tolerance)
    feeds = dict(zip(kv_input_names(layers), out[1:]))
    out = session.run(None, {"input_ids": np.asarray([ids[-1:]]), "position_ids": np.asarray([[6]]),
                             "attention_mask": np.ones((1, 7), dtype=np.int64), **feeds})
    _close("model.onnx", "decode-step logits", out[0][0], want[-1], tolerance)


def add_to_bundle(model, adapter: FamilyAdapter, bundle_dir: Path, manifest, verify_it: bool, threshold: int):
    """Write `model.onnx` into a bundle being staged, verify it, list it in the manifest's attachments."""
    with torch.no_grad():
        files = write(adapter, bundle_dir, threshold)
    if verify_it:
        verify(model, Path(bundle_dir) / FILE)
    for name in files:
        manifest = manifest.attach(ATTACHMENT if name == FILE else f"{ATTACHMENT}_data", bundle_dir, name)
    manifest.save(bundle_dir)
    return manifest
