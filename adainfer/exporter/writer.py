"""Turn a Hugging Face causal LM into a bundle: per-block ONNX graphs, heads, tokenizer, manifest.

The bundle is built in a temporary directory beside the target, verified, and renamed
into place only when complete: an interrupted or failed export leaves no bundle behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import onnx
import torch
import transformers
from tqdm import tqdm

from .. import __version__
from ..errors import ExportError
from ..manifest import SCHEMA_VERSION, ExporterInfo, GraphSpec, Macs, Manifest, ModelSource, TensorSpec, file_spec, sha256_of
from ..paths import DEFAULT_MODEL_DIR
from . import monolithic as whole_model
from . import convert, gguf_source, kv_cache, quantize, span_writer, staging
from .families import FamilyAdapter, adapter_class_for, adapter_for
from .graph_export import OPSET, export_graph as _export_one
from .graphs import GraphDef, graph_defs
from .loading import check_loading_info
from .shared_weights import share_weights
from .tokenizer_check import check_tokenizer_fits
from .verify import verify_against_transformers, verify_graph

#: graphs whose weights exceed this are saved with ONNX external data (protobuf's limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1 << 30
#: files copied from the model directory when present
MODEL_FILES = ("tokenizer.json", "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja")

ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
               onnx.TensorProto.INT32: "int32", onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT8: "int8"}


def load_model(model_dir: Path):
    """Load a model directory with safetensors weights only (never unpickling)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"model directory not found: {model_dir}" if not model_dir.exists() else f"not a directory: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ExportError(f"{config_path}: no model_type")
    if not isinstance(config["model_type"], str):
        raise ExportError(f"{config_path}: model_type must be a string, got {json.dumps(config['model_type'])[:40]}")
    adapter_class_for(config["model_type"])  # refuse unsupported families before loading weights
    if not any(model_dir.glob("*.safetensors")):
        raise ExportError(f"{model_dir}: no .safetensors weights (pickled checkpoints are not loaded)")
    if (model_dir / "tokenizer.json").exists():
        _check_tokenizer(model_dir / "tokenizer.json")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, use_safetensors=True, attn_implementation="eager", output_loading_info=True
            )
    except Exception as exc:  # transformers raises many types for a broken directory
        raise ExportError(f"cannot load model from {model_dir}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    check_loading_info(info, model_dir)
    return model.eval()


def _check_tokenizer(path: Path) -> None:
    """Refuse a tokenizer.json the runtime could not read, before any work is done."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise ExportError(f"{path}: not a usable tokenizer ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def export(
    model_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    *,
    force: bool = False,
    verify: bool = True,
    progress: bool = True,
    precision: str = "fp32",
    quantize_heads: Optional[bool] = None,
    monolithic: bool = False,
    fused: bool = True,
    block_size: int = quantize.NBITS_BLOCK_SIZE,
    grid: str = "gguf",
    head_bits: Optional[int] = None,
    head_refine: int = 0,
    kv: str = "float32",
    kv_scaling: str = "per-channel",
    kv_margin: float = kv_cache.DEFAULT_MARGIN,
) -> Manifest:
    """Export a model (the bundled stories260K by default) to a bundle directory.

    `model_dir` is a Hugging Face directory, a GGUF file, or a directory holding one GGUF file;
    a GGUF is dequantized to float32 in a temporary directory first (`gguf_source`) and the
    manifest records it under `source`."""
    quantize.check_precision(precision)
    quantize.check_block_size(block_size)
    quantize.check_options(precision, grid, head_bits, head_refine, quantize_heads)
    kv_cache.check_kv(kv, kv_scaling, kv_margin)
    if kv != "float32" and not fused:
        raise ExportError(f"--kv {kv} needs the fused blocks (GroupQueryAttention); --generic-blocks keeps a float32 cache")
    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    gguf = gguf_source.find_gguf(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_bundle_dir(model_dir)
    staging.check_not_inside(out_dir, model_dir)
    staging.check_target(out_dir, force)
    options = dict(force=force, verify=verify, progress=progress, precision=precision, quantize_heads=quantize_heads,
                   monolithic=monolithic, fused=fused, block_size=block_size, grid=grid, head_bits=head_bits,
                   head_refine=head_refine, kv=kv, kv_scaling=kv_scaling, kv_margin=kv_margin)
    if gguf is None:
        return export_model(load_model(model_dir), out_dir, model_dir=model_dir, **options)
    header = gguf_source.read_header(gguf)  # refuses an unsupported architecture or a damaged file first
    with tempfile.TemporaryDirectory(prefix="adainfer-gguf-") as scratch:
        hf_dir = gguf_source.gguf_to_hf_dir(gguf, Path(scratch) / "hf", header=header, progress=progress)
        model = load_model(hf_dir)
        return export_model(model, out_dir, model_dir=hf_dir, source=gguf_source.source_of(gguf, header), **options)


def default_bundle_dir(model: Path) -> Path:
    """bundles/<model name>; a GGUF file's name without `.gguf`."""
    model = Path(model)
    name = model.stem if model.is_file() and model.suffix.lower() == gguf_source.SUFFIX else model.name
    return Path("bundles") / name


def export_model(
    model,
    out_dir: Path,
    *,
    model_dir: Optional[Path] = None,
    tokenizer_file: Optional[Path] = None,
    force: bool = False,
    verify: bool = True,
    progress: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    precision: str = "fp32",
    quantize_heads: Optional[bool] = None,
    monolithic: bool = False,
    source: Optional[ModelSource] = None,
    fused: bool = True,
    block_size: int = quantize.NBITS_BLOCK_SIZE,
    grid: str = "gguf",
    head_bits: Optional[int] = None,
    head_refine: int = 0,
    kv: str = "float32",
    kv_scaling: str = "per-channel",
    kv_margin: float = kv_cache.DEFAULT_MARGIN,
) -> Manifest:
    """Export an already loaded `transformers` model; `model_dir` supplies tokenizer and config files.

    `fused` (default) writes blocks the family can write with ONNX Runtime's fused operators that
    way (`FamilyAdapter.fused_block`); False traces every block (standard ONNX ops: TensorRT).

    `precision` other than fp32 converts the block and kv_fill graphs (and with `quantize_heads` the embedding
    and heads; None: the precision's default, `quantize.HEADS_BY_DEFAULT`) after the float32 bundle was
    exported and verified, checks each converted graph's structure and the chain's top-1 agreement and
    perplexity on held-out text against the thresholds `quality.THRESHOLDS` states. `block_size`: the
    MatMulNBits block (int8-weight, int4), recorded in the manifest; `grid` and `head_bits`: int4's treatment of
    weights on a GGUF grid and the embedding's and heads' bits (`quantize.convert`); `head_refine`: 8-bit LM heads
    rank at 4 bits and re-score that many candidates at 8 (`head_refine.py`). `monolithic` also writes the whole model as
    one graph, `model.onnx` (see `monolithic.py`), the baseline `adainfer bench` compares with. `kv` "int8": the
    block graphs keep an int8 KV cache with static `kv_scaling` scales calibrated on text (`kv_cache.py`), judged
    on held-out text before any precision conversion; only fused blocks can (GroupQueryAttention holds it).
    """
    quantize.check_precision(precision)
    quantize.check_block_size(block_size)
    quantize.check_options(precision, grid, head_bits, head_refine, quantize_heads)
    kv_cache.check_kv(kv, kv_scaling, kv_margin)
    quantize_heads = quantize.heads_by_default(precision) if quantize_heads is None else quantize_heads
    out_dir = Path(out_dir)
    staging.check_not_inside(out_dir, model_dir)
    staging.check_target(out_dir, force)
    model = model.eval().float()
    adapter = adapter_for(model)
    if kv != "float32" and not (fused and all(adapter.fused_block(i) for i in range(adapter.geometry().num_layers))):
        raise ExportError(f"--kv {kv} needs fused Llama-layout blocks (GroupQueryAttention); "
                          f"{adapter.name} blocks{' with --generic-blocks' if not fused else ''} keep a float32 cache")
    check_tokenizer_fits(tokenizer_file or (Path(model_dir) / "tokenizer.json" if model_dir else None),
                         adapter.geometry().vocab_size)
    with staging.staged_directory(out_dir, force=force) as tmp:
        with torch.no_grad():
            graphs = _export_graphs(adapter, tmp, verify, progress, external_data_threshold, fused)
        files = _copy_model_files(model, tmp, model_dir, tokenizer_file)
        graphs, files = _share(adapter, tmp, graphs, files, verify, external_data_threshold)
        manifest = dataclasses.replace(_manifest(adapter, graphs, files), source=source)
        manifest.save(tmp)
        staging.checkpoint("manifest")
        if verify:
            verify_against_transformers(model, tmp)
        if monolithic:
            manifest = whole_model.add_to_bundle(model, adapter, tmp, manifest, verify, external_data_threshold)
        if kv != "float32":
            manifest = kv_cache.quantize_kv(tmp, manifest, kv_scaling, kv_margin, model=model, verify=verify)
        if precision != "fp32" or head_bits is not None:  # fp32 with head_bits: only the LM heads are converted
            manifest = convert.quantize_graphs(model, tmp, manifest, precision, quantize_heads, verify,
                                               external_data_threshold, block_size, grid, head_bits, head_refine)
        # all blocks as one graph (`span_writer`): full-depth steps run embed -> span -> head
        manifest = span_writer.add_full_span(tmp, manifest, external_data_threshold, check=verify)
    return manifest


def _share(adapter: FamilyAdapter, tmp: Path, graphs: dict[str, GraphSpec], files: dict, verify: bool,
           threshold: int) -> tuple[dict[str, GraphSpec], dict]:
    """Store the weights several graphs hold once (`shared_weights.py`); re-verify the heads it rewrote."""
    shared = share_weights(tmp, [spec.file for spec in graphs.values()], threshold)
    if verify:
        with torch.no_grad():
            for gdef in graph_defs(adapter):
                if gdef.name.endswith("_head") and gdef.name in graphs:
                    verify_graph(gdef, tmp / graphs[gdef.name].file)
    graphs = {name: dataclasses.replace(_graph_spec(tmp / spec.file), precision=spec.precision)
              for name, spec in graphs.items()}
    files = dict(files)
    if shared:
        files["shared_weights"] = file_spec(tmp, shared)
    return graphs, files


def _export_graphs(adapter: FamilyAdapter, tmp: Path, verify: bool, progress: bool, threshold: int,
                   fused: bool = True) -> dict[str, GraphSpec]:
    specs = {}
    defs = graph_defs(adapter, fused=fused)
    for gdef in tqdm(defs, desc="export", unit="graph", disable=not progress):
        path = tmp / f"{gdef.name}.onnx"
        _export_one(gdef, path, threshold)
        if verify:
            verify_graph(gdef, path)
        specs[gdef.name] = _graph_spec(path)
        staging.checkpoint(gdef.name)  # test hook (ADAINFER_TEST_KILL_AT / _PAUSE_AT), else a no-op
    return specs


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        specs.append(TensorSpec(name=v.name, dtype=ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape=dims))
    return specs


def _graph_spec(path: Path) -> GraphSpec:
    model = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    data_files = [file_spec(path.parent, data.name)] if data.exists() else []
    return GraphSpec(file=path.name, sha256=sha256_of(path), size=path.stat().st_size,
                     inputs=_tensor_specs(model.graph.input), outputs=_tensor_specs(model.graph.output),
                     data_files=data_files)


def _copy_model_files(model, tmp: Path, model_dir: Optional[Path], tokenizer_file: Optional[Path]) -> dict:
    files = {}
    if model_dir is not None:
        for name in MODEL_FILES:
            src = Path(model_dir) / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    if not (tmp / "config.json").exists():
        model.config.to_json_file(str(tmp / "config.json"))
    for name in MODEL_FILES:
        if (tmp / name).exists():
            files[Path(name).stem] = file_spec(tmp, name)
    return files


def _eos_ids(model) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _manifest(adapter: FamilyAdapter, graphs: dict[str, GraphSpec], files: dict) -> Manifest:
    g = adapter.geometry()
    config = adapter.config
    return Manifest(
        schema_version=SCHEMA_VERSION,
        family=adapter.name,
        model_type=config.model_type,
        num_layers=g.num_layers,
        hidden_size=g.hidden_size,
        vocab_size=g.vocab_size,
        max_positions=g.max_positions,
        num_heads=g.num_heads,
        num_kv_heads=g.num_kv_heads,
        head_dim=g.head_dim,
        dtype="float32",
        padding_side="left",
        bos_token_id=config.bos_token_id if isinstance(config.bos_token_id, int) else None,
        eos_token_ids=_eos_ids(adapter.model),
        graphs=graphs,
        files=files,
        macs=Macs(embed=adapter.embed_macs(), blocks=[adapter.block_macs(i) for i in range(g.num_layers)],
                  exit_head=adapter.head_macs(), final_head=adapter.head_macs(),
                  kv_fill=[adapter.kv_fill_macs(i) for i in range(g.num_layers)]),
        exporter=ExporterInfo(adainfer=__version__, torch=torch.__version__, transformers=transformers.__version__,
                              onnx=onnx.__version__, opset=OPSET),
    )
