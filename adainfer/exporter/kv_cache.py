"""An int8 KV cache for fused Llama blocks: static scales calibrated on text, the fused kernel does the rest.

Why this form. ONNX Runtime's CPU `com.microsoft.GroupQueryAttention` (1.31) keeps int8 past/present
key and value when given `k_scale` / `v_scale` and `kv_cache_bit_width=8`: it quantizes the new keys and
values into `present_*` (round half to even, saturate to [-128, 127], symmetric, no zero point) and
attends over the dequantized cache, new tokens included, in prefill, decode and chunked verification
alike (measured against a float GroupQueryAttention fed the dequantized tensors: equal within 5e-7).
Its scales are static and either PER_TENSOR or PER_CHANNEL (`[kv_heads, 1, head_dim]`); a per-token
scale would need a dequantize-then-attend graph instead of the fused kernel. So the scales are one
per layer, K/V, head and channel (`per-channel`, default; `per-tensor` is the cheaper alternative),
taken from the float32 bundle's own keys (after rotary) and values on calibration text, each story read
with and without its BOS token:
`scale = margin * max|x| / 127`; values beyond the calibrated range saturate.

The block graphs' interface is unchanged except the dtype of past_key / past_value / present_key /
present_value (int8), so the runtime only makes its empty cache of that dtype. The `kv_fill_NN`
graphs (early exit: keys and values of skipped layers) end with the same encoding written as ONNX
ops (Div by the same scale, Round (half to even), Clip, Cast), so a filled cache row equals what the
block would have stored (`verify_kv_graphs` checks both). The manifest records the format under
`kv_cache`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError
from ..manifest import KVCacheFormat, Manifest
from ..paths import DEFAULT_CALIB_DATA

KV_DTYPES = ("float32", "int8")
KV_SCALINGS = ("per-channel", "per-tensor")
#: scales cover margin x the largest |key| / |value| seen in calibration (head room for unseen text)
DEFAULT_MARGIN = 1.2
#: calibration text read for the scales: stories, tokens per story at most
CALIB_STORIES = 24
CALIB_TOKENS = 256
#: the int8 cache against the float32 one on held-out text (`quality.measure`): lowest top-1 agreement and
#: highest perplexity ratio, both against the float32 model. Measured: see docs/quant/README.md.
THRESHOLDS = (0.97, 1.01)
_QUANT_TYPE = {"per-channel": "PER_CHANNEL", "per-tensor": "PER_TENSOR"}
_GQA = "GroupQueryAttention"


def check_kv(kv: str, scaling: str = "per-channel", margin: float = DEFAULT_MARGIN) -> None:
    if kv not in KV_DTYPES:
        raise ExportError(f"unknown KV cache type {kv!r} (choose from {', '.join(KV_DTYPES)})")
    if scaling not in KV_SCALINGS:
        raise ExportError(f"unknown KV scaling {scaling!r} (choose from {', '.join(KV_SCALINGS)})")
    if not (np.isfinite(margin) and 1.0 <= margin <= 4.0):
        raise ExportError(f"--kv-margin must be between 1 and 4, got {margin}")


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """Bytes one token adds to the cache: keys and values of every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * np.dtype(dtype).itemsize


def calibration_absmax(bundle_dir: Path, text: Path = DEFAULT_CALIB_DATA, stories: int = CALIB_STORIES,
                       max_tokens: int = CALIB_TOKENS) -> tuple[np.ndarray, np.ndarray, int]:
    """max |key| and max |value| per (layer, kv head, channel) of the float32 bundle on `text`, and the tokens read."""
    from ..runtime import load
    from .quality import held_out_sequences

    model = load(bundle_dir, check_digests=False)
    m = model.manifest
    tokenizer = Path(bundle_dir) / "tokenizer.json"
    sequences = held_out_sequences(tokenizer if tokenizer.is_file() else None, m.vocab_size, m.bos_token_id,
                                   text=text, stories=stories, max_tokens=max_tokens)
    k_max = np.zeros((m.num_layers, m.num_kv_heads, m.head_dim), np.float32)
    v_max = np.zeros_like(k_max)
    tokens = 0
    # each story with and without its BOS: the first token of a prompt (which need not be BOS) is where the
    # largest values occur (SmolLM2: layer 1's values at position 0 reach 2x the BOS-led range)
    variants = [v for ids in sequences.ids for v in (ids, ids[1:] if m.bos_token_id is not None and ids[:1] == [m.bos_token_id] else [])]
    for ids in filter(None, variants):
        input_ids = np.asarray([ids], dtype=np.int64)
        state = model.new_state(1)
        model.run_layers(input_ids, state)
        for layer in range(m.num_layers):  # (1, kv heads, length, head_dim)
            k_max[layer] = np.maximum(k_max[layer], np.abs(state.keys[layer][0]).max(axis=1))
            v_max[layer] = np.maximum(v_max[layer], np.abs(state.values[layer][0]).max(axis=1))
        tokens += len(ids)
    return k_max, v_max, tokens


def scales(absmax: np.ndarray, scaling: str, margin: float) -> np.ndarray:
    """One layer's scale tensor for GroupQueryAttention: [kv_heads, 1, head_dim] or [1]."""
    top = absmax if scaling == "per-channel" else np.asarray([absmax.max()])
    scale = np.maximum(top.astype(np.float64) * margin / 127.0, 1e-8).astype(np.float32)
    return scale[:, None, :] if scaling == "per-channel" else scale


def quantize(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The cache's encoding in numpy (tests, checks): round half to even, saturate, int8."""
    return np.clip(np.rint(x / scale), -128, 127).astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def _set_int8(values, names) -> None:
    for v in values:
        if v.name in names:
            v.type.tensor_type.elem_type = TensorProto.INT8


def rewrite_block(path: Path, k_scale: np.ndarray, v_scale: np.ndarray, scaling: str) -> None:
    """Give a fused block graph an int8 cache: scales on its GroupQueryAttention, int8 past/present."""
    model = onnx.load(str(path), load_external_data=False)  # weights in shared_weights.bin stay where they are
    nodes = [n for n in model.graph.node if n.op_type == _GQA and n.domain == "com.microsoft"]
    if len(nodes) != 1:
        raise ExportError(f"{path.name}: an int8 KV cache needs a fused block (one GroupQueryAttention), found {len(nodes)}")
    node = nodes[0]
    while len(node.input) < 12:  # ... attention_bias (10), head_sink (11), then k_scale (12), v_scale (13)
        node.input.append("")
    node.input.extend(["kv_cache.k_scale", "kv_cache.v_scale"])
    model.graph.initializer.extend([numpy_helper.from_array(k_scale, "kv_cache.k_scale"),
                                    numpy_helper.from_array(v_scale, "kv_cache.v_scale")])
    quant = _QUANT_TYPE[scaling]
    node.attribute.extend([helper.make_attribute("k_quant_type", quant), helper.make_attribute("v_quant_type", quant),
                           helper.make_attribute("kv_cache_bit_width", 8)])
    _set_int8(model.graph.input, ("past_key", "past_value"))
    _set_int8(model.graph.output, ("present_key", "present_value"))
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def rewrite_fill(path: Path, k_scale: np.ndarray, v_scale: np.ndarray) -> None:
    """End a kv_fill graph with the block's encoding: key / value become int8."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    for out, scale in (("key", k_scale), ("value", v_scale)):
        float_name = f"{out}_float"
        for node in g.node:
            node.output[:] = [float_name if o == out else o for o in node.output]
            node.input[:] = [float_name if i == out else i for i in node.input]
        g.initializer.extend([numpy_helper.from_array(scale, f"kv_cache.{out}_scale")])
        g.node.extend([
            helper.make_node("Div", [float_name, f"kv_cache.{out}_scale"], [f"{out}_scaled"], name=f"kv_cache/{out}_div"),
            helper.make_node("Round", [f"{out}_scaled"], [f"{out}_rounded"], name=f"kv_cache/{out}_round"),
            helper.make_node("Clip", [f"{out}_rounded", "kv_cache.int8_min", "kv_cache.int8_max"], [f"{out}_clipped"],
                             name=f"kv_cache/{out}_clip"),
            helper.make_node("Cast", [f"{out}_clipped"], [out], to=TensorProto.INT8, name=f"kv_cache/{out}_cast")])
    g.initializer.extend([numpy_helper.from_array(np.array(-128.0, np.float32), "kv_cache.int8_min"),
                          numpy_helper.from_array(np.array(127.0, np.float32), "kv_cache.int8_max")])
    _set_int8(g.output, ("key", "value"))
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def graph_scales(path: Path) -> dict[str, np.ndarray]:
    """Input / output name -> its int8 scale, for a block or kv_fill graph with an int8 cache ({} for a float one)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    names = {"past_key": "kv_cache.k_scale", "present_key": "kv_cache.k_scale", "past_value": "kv_cache.v_scale",
             "present_value": "kv_cache.v_scale", "key": "kv_cache.key_scale", "value": "kv_cache.value_scale"}
    return {io: numpy_helper.to_array(inits[init]) for io, init in names.items() if init in inits}


def block_scales(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (k_scale, v_scale) a rewritten block graph holds."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    return (numpy_helper.to_array(inits["kv_cache.k_scale"]), numpy_helper.to_array(inits["kv_cache.v_scale"]))


def check_fill_matches_block(bundle_dir: Path, manifest: Manifest, seed: int = 0) -> int:
    """Every layer's kv_fill graph must store exactly what its block stores for the same tokens (seeded
    random hidden states, one row of 5 tokens, no past); returns the layers checked. ExportError otherwise."""
    from ..runtime.sessions import make_session

    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((1, 5, manifest.hidden_size)).astype(np.float32)
    positions = np.arange(5, dtype=np.int64)[None]
    empty = np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), np.int8)
    checked = 0
    for layer, name in enumerate(manifest.block_names):
        fill = f"kv_fill_{layer:02d}"
        if fill not in manifest.graphs:
            continue
        block = make_session(Path(bundle_dir) / manifest.graphs[name].file, threads=1)
        _, key, value = block.run(None, {"hidden_states": hidden, "position_ids": positions,
                                         "attention_mask": np.ones((1, 5), np.int64), "past_key": empty, "past_value": empty})
        fill_key, fill_value = make_session(Path(bundle_dir) / manifest.graphs[fill].file, threads=1).run(
            None, {"hidden_states": hidden, "position_ids": positions})
        for what, a, b in (("keys", key, fill_key), ("values", value, fill_value)):
            if a.dtype != np.int8 or b.dtype != np.int8 or not np.array_equal(a, b):
                differ = int((a.astype(np.int32) != b.astype(np.int32)).sum()) if a.shape == b.shape else -1
                raise ExportError(f"{fill}: its int8 {what} differ from {name}'s in {differ} entries")
        checked += 1
    return checked


def quantize_kv(tmp: Path, manifest: Manifest, scaling: str = "per-channel", margin: float = DEFAULT_MARGIN,
                calibration: Path = DEFAULT_CALIB_DATA, model=None, verify: bool = True,
                stories: int = CALIB_STORIES, max_tokens: int = CALIB_TOKENS) -> Manifest:
    """Turn the verified float32 bundle in `tmp` into one with an int8 KV cache, in place; returns its manifest.

    With `verify` and `model` (the float32 transformers model), the bundle's top-1 agreement and perplexity on
    held-out text must stay within `THRESHOLDS` of the model (`quality.measure`), or the export is refused."""
    from .writer import _graph_spec

    check_kv("int8", scaling, margin)
    for name in manifest.block_names:
        spec = manifest.graphs[name]
        past = next(t for t in spec.inputs if t.name == "past_key")
        if past.dtype != "float32":
            raise ExportError(f"{name}: the KV cache is already {past.dtype}")
    k_max, v_max, tokens = calibration_absmax(tmp, calibration, stories, max_tokens)
    graphs = dict(manifest.graphs)
    for layer, name in enumerate(manifest.block_names):
        k_scale, v_scale = scales(k_max[layer], scaling, margin), scales(v_max[layer], scaling, margin)
        rewrite_block(tmp / graphs[name].file, k_scale, v_scale, scaling)
        graphs[name] = dataclasses.replace(_graph_spec(tmp / graphs[name].file), precision=graphs[name].precision,
                                           data_files=graphs[name].data_files)
        fill = f"kv_fill_{layer:02d}"
        if fill in graphs:
            rewrite_fill(tmp / graphs[fill].file, k_scale, v_scale)
            graphs[fill] = dataclasses.replace(_graph_spec(tmp / graphs[fill].file), precision=graphs[fill].precision,
                                               data_files=graphs[fill].data_files)
    per_scale = manifest.num_kv_heads * manifest.head_dim if scaling == "per-channel" else 1
    fmt = KVCacheFormat(dtype="int8", scaling=scaling, margin=float(margin),
                        calibration=f"{Path(calibration).name}: {len(range(stories))} stories at most, {tokens} tokens",
                        bytes_per_token=bytes_per_token(manifest.num_layers, manifest.num_kv_heads, manifest.head_dim, "int8"),
                        float32_bytes_per_token=bytes_per_token(manifest.num_layers, manifest.num_kv_heads,
                                                                manifest.head_dim, "float32"),
                        scale_bytes=2 * manifest.num_layers * per_scale * 4)
    manifest = dataclasses.replace(manifest, graphs=graphs, kv_cache=fmt)
    manifest.save(tmp)
    if verify:
        check_fill_matches_block(tmp, manifest)
    if verify and model is not None:
        from . import quality

        tokenizer = tmp / "tokenizer.json"
        sequences = quality.held_out_sequences(tokenizer if tokenizer.is_file() else None, manifest.vocab_size,
                                               manifest.bos_token_id)
        result = quality.check("kv int8", quality.measure(tmp, sequences, quality.torch_reference(model, sequences)),
                               THRESHOLDS)
        manifest = dataclasses.replace(manifest, kv_cache=dataclasses.replace(fmt, quality=result))
        manifest.save(tmp)
    return manifest


def convert_kv_bundle(src: Path, out_dir: Path, *, scaling: str = "per-channel", margin: float = DEFAULT_MARGIN,
                      model=None, force: bool = False, verify: bool = True,
                      external_data_threshold: int = 1 << 30) -> Manifest:
    """Write `out_dir`: the float32-cache bundle `src` with an int8 KV cache, without exporting from PyTorch again
    (its graphs and model files are copied; attachments such as a calibrated exit are not: they belong to `src`).
    `model` (the float32 transformers model) enables the quality check on held-out text."""
    from . import staging
    from .span_writer import add_full_span, without_spans

    check_kv("int8", scaling, margin)
    manifest = without_spans(Manifest.load(src))  # the span is merged again from the int8-cache blocks
    if manifest.kv_cache is not None:
        raise ExportError(f"{src} already has a {manifest.kv_cache.dtype} KV cache")
    staging.check_target(Path(out_dir), force)
    with staging.staged_directory(Path(out_dir), force=force) as tmp:
        manifest = staging.copy_export(src, manifest, tmp)
        manifest = quantize_kv(tmp, manifest, scaling, margin, model=model, verify=verify)
        manifest = add_full_span(tmp, manifest, external_data_threshold, check=verify)
    return manifest
