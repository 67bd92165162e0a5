"""What `adainfer bench` measures: a GGUF file, a model directory, or a random-weight Llama named by shape.

A GGUF file is dequantized once into a float32 Hugging Face directory in the cache
(`gguf_source.gguf_to_hf_dir`). The model is exported once per precision (fp32 with `model.onnx`)
into the cache directory and reused while its manifest says it came from the same source.
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
#: bench-only precision names -> (the export's --precision, its head options): float32 blocks with the LM heads
#: at 8 or 4 bits (`adainfer-export --head-bits`), and 8-bit heads ranking at 4 bits with their best 64 tokens
#: re-scored at 8 (`--head-refine 64`)
VARIANTS = {"fp32-head8": ("fp32", dict(head_bits=8)), "fp32-head4": ("fp32", dict(head_bits=4)),
            "fp32-head8-refine": ("fp32", dict(head_bits=8, head_refine=64)),
            "int4-refine": ("int4", dict(head_refine=64))}


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


def _sha256(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def source_of(model: Optional[Path], shape: Optional[str], cache_dir: Path = Path("bundles")) -> dict:
    """What to measure: {"kind": "shape"|"model_dir"|"gguf", "name", ...}; a GGUF source's "model_dir" is its
    dequantized float32 directory in `cache_dir` (made by `hf_dir_for`)."""
    if shape is not None:
        shape_config(shape)  # refuse unknown names before any work
        return {"kind": "shape", "name": shape, "config": SHAPES[shape], "seed": SEED}
    from ..paths import DEFAULT_MODEL_DIR

    model = Path(model) if model is not None else DEFAULT_MODEL_DIR
    if model.is_dir() and not (model / "config.json").is_file() and len(list(model.glob("*.gguf"))) == 1:
        model = next(model.glob("*.gguf"))  # a directory holding one GGUF file
    if model.is_file() and model.suffix == ".gguf":
        name = model.stem
        return {"kind": "gguf", "name": name, "gguf": str(model.resolve()), "sha256": _sha256([model]),
                "model_dir": str((Path(cache_dir) / f"{name}-hf").resolve())}
    if not (model / "config.json").is_file():
        raise BenchError(f"model directory not found (no config.json): {model}")
    return {"kind": "model_dir", "name": model.name, "model_dir": str(model.resolve()),
            "sha256": _sha256(sorted(model.glob("*.safetensors")) + [model / "config.json"])}


def hf_dir_for(source: dict, progress: bool = True) -> Optional[Path]:
    """The float32 Hugging Face directory of a source (a GGUF file is dequantized on first use); None for a shape."""
    if source["kind"] == "shape":
        return None
    out = Path(source["model_dir"])
    if source["kind"] == "gguf":
        stamp = out / "adainfer_source.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == source["sha256"]):
            import shutil

            from ..exporter.gguf_source import gguf_to_hf_dir

            if progress:
                print(f"dequantizing {source['gguf']} into {out}", flush=True)
            staging = out.with_name(out.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            gguf_to_hf_dir(Path(source["gguf"]), staging)
            (staging / "adainfer_source.json").write_text(json.dumps({"gguf": source["gguf"], "sha256": source["sha256"]}))
            shutil.rmtree(out, ignore_errors=True)
            staging.rename(out)
    return out


def bundle_dir(source: dict, cache_dir: Path, precision: str = "fp32") -> Path:
    prefix = "shape-" if source["kind"] == "shape" else "bench-"
    return Path(cache_dir) / (f"{prefix}{source['name']}" + ("" if precision == "fp32" else f"-{precision}"))


def bundle_for(source: dict, cache_dir: Path, progress: bool = True, precision: str = "fp32") -> Path:
    """The cached bundle of `source` at `precision` (fp32 with `model.onnx`), exported now if missing or stale.
    A quantized export that fails its quality check raises its ExportError (nothing is cached)."""
    from ..manifest import Manifest

    out = bundle_dir(source, cache_dir, precision)
    if (out / "manifest.json").is_file():
        try:
            manifest = Manifest.load(out)
            if (manifest.extras.get(SOURCE_KEY) == json.loads(json.dumps(source))
                    and (precision != "fp32" or "monolithic" in manifest.attachments)
                    and _current_quantization(manifest, precision)):
                return out
        except AdainferError:
            pass
    import dataclasses

    from ..exporter.convert import convert_bundle
    from ..exporter.writer import export_model

    fp32 = bundle_for(source, cache_dir, progress) if precision != "fp32" else None
    if progress:
        print(f"exporting {source['name']} ({precision}) to {out}" + (" (per-block bundle and model.onnx)"
                                                                        if precision == "fp32" else ""), flush=True)
    model_dir = hf_dir_for(source, progress)
    model = load_source_model(source)
    if fp32 is None:
        manifest = export_model(model, out, model_dir=model_dir, force=True, verify=True, progress=progress,
                                monolithic=True)
    elif precision in VARIANTS:  # another treatment of the LM heads
        base, options = VARIANTS[precision]
        manifest = convert_bundle(model, fp32, out, base, force=True, **options)
    else:  # converted from the cached float32 bundle (checked as an export is), not exported again
        manifest = convert_bundle(model, fp32, out, precision, force=True)
    manifest = dataclasses.replace(manifest, extras={**manifest.extras, SOURCE_KEY: source})
    manifest.save(out)
    return out


def _current_quantization(manifest, precision: str) -> bool:
    """Whether a cached bundle was converted with today's settings (e.g. before projections were fused, it was not)."""
    from ..exporter import quantize

    if precision in VARIANTS:
        base, options = VARIANTS[precision]
        wanted = {**(quantize.nbits_settings(base) if base in quantize.NBITS else {}), **options}
    else:
        wanted = quantize.nbits_settings(precision) if precision in quantize.PRECISIONS else {}
    recorded = manifest.extras.get("quantization", {})
    return all(recorded.get(k) == v for k, v in wanted.items())


def monolithic_at(source: dict, cache_dir: Path, precision: str, progress: bool = True) -> Path:
    """`model.onnx` converted to `precision` (`quantize.convert`, every weight: embedding, blocks, head) in a
    directory of its own beside the bundles, with the float32 bundle's manifest for the geometry: the
    whole model as one graph at that precision, so the chain's per-call cost shows against the same kernels."""
    import shutil

    from ..exporter import quantize

    fp32 = bundle_for(source, cache_dir, progress)
    out = bundle_dir(source, cache_dir, precision).with_name(bundle_dir(source, cache_dir, precision).name + "-monolithic")
    stamp = out / "adainfer_source.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(source)):
        return out
    if progress:
        print(f"converting {fp32 / 'model.onnx'} to {precision} into {out}", flush=True)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(fp32 / "manifest.json", staging / "manifest.json")
    quantize.convert(fp32 / "model.onnx", staging / "model.onnx", precision)
    stamp_file = staging / "adainfer_source.json"
    stamp_file.write_text(json.dumps(source))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
