"""ONNX-to-ONNX precision conversion of a bundle graph (ONNX Runtime targets).

One job: read a float32 graph, write the same graph at another precision. Inputs and
outputs stay float32 (and int64), so the runtime and the KV cache are unchanged.

| precision      | what changes                                                                 |
|----------------|------------------------------------------------------------------------------|
| `fp32`         | nothing                                                                       |
| `fp16`         | weight MatMuls/Gemms (and the embedding Gather) run in float16 with float16    |
|                | weights, between Casts; norms, rotary, softmax, the residual stream            |
|                | and every graph input/output stay float32                                     |
| `int8-weight`  | MatMuls with constant weights become `MatMulNBits` (8 bits, symmetric,        |
|                | blocks along K, int8 compute: `accuracy_level` 4); the embedding table        |
|                | becomes 8-bit + `DequantizeLinear`                                             |
| `int4`         | MatMuls become `MatMulNBits` (4 bits, symmetric, blocks along K, int8         |
|                | compute), as onnxruntime-genai's int4; the embedding (with the heads)         |
|                | becomes `GatherBlockQuantized` (4 bits, blocks along the hidden axis)         |
| `int8-dynamic` | `quantize_dynamic`: weights int8 per output channel, activations quantized     |
|                | per call (`DynamicQuantizeLinear` -> `MatMulInteger`); only MatMuls with a     |
|                | constant B (attention scores stay float32)                                    |

For the integer precisions a Gemm with a constant B (GPT-2's Conv1D) is first rewritten as
MatMul + Add, since neither quantizer converts Gemm. For the MatMulNBits precisions, MatMuls that
read the same input (q/k/v, gate/up) are first fused into one MatMul on their concatenated weights
and a Split (`fuse_projections`), as onnxruntime-genai's builder writes `qkv_proj`: one quantized
kernel (and, for a GGUF grid, one float offset term) instead of three. On SmolLM2 int4 a block
went from 53 to 46 nodes after ONNX Runtime's optimizer (docs/bench/speed-profile.md).

Weights on a GGUF grid are re-encoded exactly (`grid="gguf"`, the default, `gguf_grid.py`);
`grid="rtn"` rounds every weight to a new symmetric 4-bit grid instead, as onnxruntime-genai does
(faster: no float offset term; less faithful: measured agreement in docs/bench/speed-profile.md).
`head_bits` sets the embedding's and heads' bits under int4: 8 keeps a Q8_0 table exact (or rounds
to 8 bits), 4 rounds them to 4 bits (genai's int4 LM head: half the bytes read per token). `refine` keeps an
8-bit head's ranking at nearly 4-bit cost: 4-bit logits, the best candidates re-scored at 8 (`head_refine.py`).

Why `accuracy_level` 4 (int8 compute): ONNX Runtime's CPU `MatMulNBits` kernel
(contrib_ops/cpu/quantization/matmul_nbits.cc) picks MLAS's `SQNBIT_CompInt8` only for accuracy
level 4; otherwise it asks for `SQNBIT_CompFp32`, which MLAS implements on x86 for 4 bits but not
for 8 bits, so an 8-bit node without level 4 is never prepacked and falls back to
`ComputeBUnpacked`: the whole weight matrix dequantized to float32 on every call, then SGEMM.
Measured on this 2-core AVX2 EPYC, one 576x1536 MatMul, one row (`tools/nbits_micro.py`): fp32
85 us, 8-bit level 0 7530 us, 8-bit level 4 67 us, 4-bit level 0 215 us, 4-bit level 4 61 us.
The quantized activations cost accuracy (blockwise int8 of each row): measured, not assumed,
by the export's quality check (`quality.py`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

from ..errors import ExportError
from .graph_files import node_attrs, replace_body, save_graph
from .head_refine import refine_heads
from .projections import fuse_projections

PRECISIONS = ("fp32", "fp16", "int8-weight", "int8-dynamic", "int4")
#: bits of the weight-only MatMulNBits precisions
NBITS = {"int8-weight": 8, "int4": 4}
#: default block size along K of MatMulNBits (onnxruntime-genai's int4 default); powers of two >= 16 work
NBITS_BLOCK_SIZE = 32
BLOCK_SIZES = (16, 32, 64, 128, 256)
#: MatMulNBits accuracy_level: 4 = activations quantized to int8 per block, int32 accumulation (see above)
ACCURACY_LEVEL = 4
#: op types that carry weights and are converted; everything else stays float32
WEIGHT_OPS = ("MatMul", "Gemm", "Gather")

#: precisions whose embedding and heads are converted too unless asked otherwise (see heads_by_default)
HEADS_BY_DEFAULT = ("int4",)
#: how int4 treats weights already on a GGUF grid: re-encode them exactly, or round them again (genai's way)
GRIDS = ("gguf", "rtn")
#: bits of the embedding and heads under int4 (None: the blocks' treatment, i.e. a Q8_0 table stays 8-bit)
HEAD_BITS = (4, 8)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    return precision


def heads_by_default(precision: str) -> bool:
    """int4 converts the embedding and heads too, as onnxruntime-genai does: at 4 bits the float32 LM head
    (hidden x vocab) would be read every token and outweigh all the blocks (SmolLM2: 113 MB vs ~60 MB)."""
    return precision in HEADS_BY_DEFAULT


def check_block_size(block_size: int) -> int:
    if block_size not in BLOCK_SIZES:
        raise ExportError(f"unsupported block size {block_size} (choose from {', '.join(map(str, BLOCK_SIZES))})")
    return block_size


def check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise ExportError(f"unknown grid {grid!r} (choose from {', '.join(GRIDS)})")
    return grid


def check_head_bits(head_bits) -> None:
    if head_bits is not None and head_bits not in HEAD_BITS:
        raise ExportError(f"unsupported head bits {head_bits} (choose from {', '.join(map(str, HEAD_BITS))})")


def check_options(precision: str, grid: str, head_bits, head_refine: int = 0, quantize_heads=None) -> None:
    """`grid` is int4's, `head_bits` int4's or a float32 bundle's, `head_refine` an 8-bit head's: refuse them
    where they would be ignored (`quantize_heads` False: int4 leaves the heads float32)."""
    check_grid(grid)
    check_head_bits(head_bits)
    if grid != "gguf" and precision != "int4":
        raise ExportError(f"--grid {grid} applies to --precision int4 only (got {precision})")
    if head_bits is not None and precision not in ("int4", "fp32"):
        raise ExportError(f"--head-bits applies to --precision int4 or fp32 only (got {precision})")
    if head_refine < 0:
        raise ExportError(f"--head-refine takes a number of candidates >= 1, or 0 for none (got {head_refine})")
    if head_refine and ((precision, head_bits) not in (("int4", None), ("int4", 8), ("fp32", 8))):
        raise ExportError("--head-refine re-scores an 8-bit LM head: use it with --precision int4 (8-bit heads) "
                          "or --precision fp32 --head-bits 8")
    if head_refine and precision == "int4" and quantize_heads is False:
        raise ExportError("--head-refine re-scores an 8-bit LM head: --no-quantize-heads keeps the heads float32")


def nbits_settings(precision: str, block_size: int = NBITS_BLOCK_SIZE, grid: str = "gguf",
                   head_bits=None, head_refine: int = 0) -> dict:
    """What the manifest records for a MatMulNBits precision ({} for the others)."""
    if precision not in NBITS:
        return {}
    settings = {"bits": NBITS[precision], "block_size": check_block_size(block_size), "accuracy_level": ACCURACY_LEVEL,
                "symmetric": True, "fused_projections": True}
    if precision == "int4":
        settings.update(grid=check_grid(grid), head_bits=head_bits)
    if head_refine:
        settings.update(head_refine=head_refine)
    return settings


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul/Gemm nodes whose B is a float initializer, Gather nodes whose table is one."""
    inits = _initializers(model)
    found = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            weight = inits[node.input[1]]
        elif node.op_type == "Gather" and node.input and node.input[0] in inits:
            weight = inits[node.input[0]]
        else:
            continue
        if weight.data_type == onnx.TensorProto.FLOAT and len(weight.dims) == 2:
            found.append(node)
    return found


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name (the converters select nodes by name)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_adainfer_{i}"
        seen.add(node.name)
    return model


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weight nodes in float16 between Casts; every other node and tensor stays float32.

    Written here rather than with onnxconverter-common: its `convert_float_to_float16` with a
    node block list declared float32 outputs as float16 (rejected by ONNX Runtime) and, with an
    op block list, did not finish on a 5-layer block graph.
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(model)
    half: dict[str, str] = {}  # float32 initializer -> its float16 copy
    nodes = []
    targets = {n.name for n in weight_nodes(model)}  # names are unique (see _named)

    def fp16_weight(name: str) -> str:
        if name not in half:
            half[name] = f"{name}_fp16"
            array = numpy_helper.to_array(inits[name]).astype("float16")
            model.graph.initializer.append(numpy_helper.from_array(array, half[name]))
        return half[name]

    for node in model.graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        for slot, name in enumerate(node.input):
            if name in inits and not (node.op_type == "Gather" and slot == 1):
                new.input.append(fp16_weight(name))
            elif node.op_type == "Gather" and slot == 1:
                new.input.append(name)  # indices
            else:
                cast = f"{name}_to_fp16_{node.name}"
                nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT16, name=f"{node.name}_cast_in{slot}"))
                new.input.append(cast)
        del new.output[:]
        new.output.append(f"{node.output[0]}_fp16")
        nodes.append(new)
        nodes.append(helper.make_node("Cast", [new.output[0]], [node.output[0]], to=TensorProto.FLOAT, name=f"{node.name}_cast_out"))
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite Gemm with a constant B (GPT-2's Conv1D) as MatMul + Add, which the int8 quantizers handle."""
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    nodes = []
    for node in model.graph.node:
        attrs = node_attrs(node)
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        b_name = node.input[1]
        if attrs.get("transB", 0):
            b_name = f"{b_name}_transposed"
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[1]]).T.copy(), b_name))
        product = node.output[0] if len(node.input) < 3 else f"{node.output[0]}_matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [product], name=f"{node.name}_matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _to_int8_dynamic(src: Path, dst: Path, model: onnx.ModelProto) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [n.name for n in weight_nodes(model)]
    quantize_dynamic(src, dst, op_types_to_quantize=list(WEIGHT_OPS), nodes_to_quantize=nodes, per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})


def _to_nbits(src: Path, dst: Path, model: onnx.ModelProto, bits: int, block_size: int,
              exact: bool = True) -> onnx.ModelProto:
    """Weight MatMuls (same-input ones fused first) -> MatMulNBits (`bits`, symmetric, int8 compute), except, with
    `exact` (4 bits), weights already on a GGUF grid, re-encoded exactly (`gguf_grid.py`); the embedding Gather ->
    an 8-bit table + DequantizeLinear (8 bits) or GatherBlockQuantized (4 bits, blocks along the hidden axis)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from .gguf_grid import OFFSET_SUFFIX, encode_exact, grid_kind

    model = fuse_projections(model, grid_kind if exact else None)
    if exact:  # a GGUF Q4_1 / Q8_0 source: keep its own weights instead of rounding them again
        model = encode_exact(model, weight_nodes(model), block_size, ACCURACY_LEVEL)
    matmuls = [n.name for n in weight_nodes(model) if n.op_type == "MatMul" and not n.name.endswith(OFFSET_SUFFIX)]
    gathers = [n.name for n in weight_nodes(model) if n.op_type == "Gather"]
    if gathers and bits == 8:  # an int8 table + DequantizeLinear after the Gather: weight-only by construction
        quantize_dynamic(src, dst, op_types_to_quantize=["Gather"], nodes_to_quantize=gathers,
                         weight_type=QuantType.QInt8)
        model = _named(onnx.load(str(dst)))
        gathers = []
    op_types = ("MatMul", "Gather") if gathers else ("MatMul",)
    if matmuls or gathers:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits,
                                              accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=op_types,
                                              quant_axes=(("MatMul", 0), ("Gather", 1)))
        # the quantizer converts every node of `op_types` whatever nodes_to_include says: exclude the others
        # (the GGUF offset MatMuls must stay float)
        excluded = [n.name for n in model.graph.node if n.op_type in op_types and n.name not in matmuls + gathers]
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, nodes_to_include=matmuls + gathers,
                                         nodes_to_exclude=excluded,
                                         op_types_to_quantize=op_types, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads (e.g. a Gemm's weight after `gemm_to_matmul` and re-encoding): a converted
    int4 head kept its whole float32 table (113 MB on SmolLM2) as dead weight."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    if len(kept) < len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@contextlib.contextmanager
def _quiet():
    """The quantizers log to the root logger and print progress bars; keep the export's output clean."""
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.WARNING))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def convert(src: Path, dst: Path, precision: str, external_data_threshold: int = 1 << 30,
            block_size: int = NBITS_BLOCK_SIZE, grid: str = "gguf", bits=None, refine: int = 0) -> None:
    """Write `src` (a float32 graph) to `dst` at `precision`; `src` and `dst` may be the same file.

    `block_size`: MatMulNBits block along K (int8-weight, int4). `grid` (int4): "gguf" re-encodes weights on a
    GGUF grid exactly, "rtn" rounds them again. `bits` (MatMulNBits precisions): this graph's bits instead of the
    precision's (an int4 bundle's heads at 8 or 4 bits); weights are then rounded to that many bits, except a
    GGUF grid of that width with `grid="gguf"`. `refine` (an LM head graph converted to 8 bits): its head ranks
    at 4 bits and re-scores its best `refine` tokens at 8 (`head_refine.py`).

    `dst` keeps its weights in `<dst name>.data` (ONNX external data) when they exceed
    `external_data_threshold`; a `.data` file of `src` that `dst` no longer uses is removed.
    """
    check_precision(precision)
    check_block_size(block_size)
    check_grid(grid)
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as scratch:
        scratch = Path(scratch)
        named_src = scratch / "src.onnx"
        out = scratch / "out.onnx"
        model = _named(onnx.load(str(src)))
        if precision.startswith("int"):
            model = gemm_to_matmul(model)
        onnx.save_model(model, str(named_src), save_as_external_data=True, location="src.onnx.data", size_threshold=1024)
        model = onnx.load(str(named_src))  # saving moved the weights out of `model`: read them back
        try:
            with _quiet():
                if precision == "fp32":
                    result = model
                elif precision == "fp16":
                    result = _to_fp16(model)
                elif precision == "int8-dynamic":
                    _to_int8_dynamic(named_src, out, model)
                    result = onnx.load(str(out))
                else:
                    # int4 keeps GGUF grids (4- or 8-bit) unless asked to round again or for 4-bit heads
                    exact = precision == "int4" and grid == "gguf" and bits != 4
                    result = _to_nbits(named_src, out, model, bits or NBITS[precision], block_size, exact=exact)
                    if refine:
                        result = refine_heads(result, refine)
            _drop_unused(result)
            weight_bytes = sum(len(t.raw_data) for t in result.graph.initializer)
            for stale in (src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data")):
                stale.unlink(missing_ok=True)
            save_graph(result, dst, weight_bytes, external_data_threshold)
        except ExportError:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ExportError(f"converting {src.name} to {precision} failed: {first}") from None
