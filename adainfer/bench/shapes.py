"""What `adainfer bench` measures: a model directory, or a random-weight Llama named by shape.

Either is exported once (per-block bundle plus `model.onnx`) into a cache directory and reused
while its manifest says it came from the same source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from ..errors import AdainferError

#: random-weight Llama configs named by shape (seeded, built without any download)
SHAPES = {
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1408, vocab_size=32000),
    "medium": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=2816, vocab_size=32000),
}
SEED = 0
SOURCE_KEY = "bench_source"


class BenchError(AdainferError):
    """A benchmark cannot run (unknown shape, missing model directory, ...)."""


def shape_config(name: str):
    import transformers

    if name not in SHAPES:
        raise BenchError(f"unknown shape {name!r} (choose from {', '.join(SHAPES)})")
    return transformers.LlamaConfig(**SHAPES[name], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                    tie_word_embeddings=False)


def build_shape_model(name: str):
    """The seeded random-weight model of a shape (same weights every time)."""
    import torch
    import transformers

    config = shape_config(name)
    torch.manual_seed(SEED)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def load_source_model(source: dict):
    """The transformers model a bundle was exported from, for the `transformers` contender."""
    if source["kind"] == "shape":
        return build_shape_model(source["name"])
    from ..exporter.writer import load_model

    return load_model(Path(source["model_dir"]))


def source_of(model_dir: Optional[Path], shape: Optional[str]) -> dict:
    if shape is not None:
        shape_config(shape)  # refuse unknown names before any work
        return {"kind": "shape", "name": shape, "config": SHAPES[shape], "seed": SEED}
    from ..paths import DEFAULT_MODEL_DIR

    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise BenchError(f"model directory not found (no config.json): {model_dir}")
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        digest.update(path.read_bytes())
    return {"kind": "model_dir", "name": model_dir.name, "model_dir": str(model_dir.resolve()),
            "sha256": digest.hexdigest()}


def bundle_for(source: dict, cache_dir: Path, progress: bool = True) -> Path:
    """The cached bundle (with `model.onnx`) for `source`, exported now if missing or stale."""
    from ..manifest import Manifest

    prefix = "shape-" if source["kind"] == "shape" else "bench-"
    out = Path(cache_dir) / f"{prefix}{source['name']}"
    if (out / "manifest.json").is_file():
        try:
            manifest = Manifest.load(out)
            if manifest.extras.get(SOURCE_KEY) == json.loads(json.dumps(source)) and "monolithic" in manifest.attachments:
                return out
        except AdainferError:
            pass
    import dataclasses

    from ..exporter.writer import export_model

    if progress:
        print(f"exporting {source['name']} to {out} (per-block bundle and model.onnx)", flush=True)
    model = load_source_model(source)
    model_dir = Path(source["model_dir"]) if source["kind"] == "model_dir" else None
    manifest = export_model(model, out, model_dir=model_dir, force=True, verify=True, progress=progress, monolithic=True)
    manifest = dataclasses.replace(manifest, extras={**manifest.extras, SOURCE_KEY: source})
    manifest.save(out)
    return out
