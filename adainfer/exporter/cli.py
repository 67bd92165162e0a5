"""`adainfer-export [MODEL] -o BUNDLE_DIR`: write a bundle from a Hugging Face model directory or a GGUF file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_common import ArgumentParser, run_main
from ..paths import DEFAULT_CALIB_DATA, DEFAULT_MODEL_DIR
from .kv_cache import DEFAULT_MARGIN, KV_DTYPES, KV_SCALINGS
from .quantize import BLOCK_SIZES, GRIDS, HEAD_BITS, NBITS_BLOCK_SIZE, PRECISIONS


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="adainfer-export", description=__doc__)
    p.add_argument("model_dir", nargs="?", type=Path, default=None, metavar="MODEL",
                   help="Hugging Face model directory, GGUF file, or directory holding one GGUF file "
                        f"(default: the bundled {DEFAULT_MODEL_DIR.name})")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="bundle directory to write (default: bundles/<model name>, a GGUF's name without .gguf)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--no-verify", action="store_true", help="skip the checks against PyTorch and transformers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="precision of the block graphs (ONNX Runtime): fp16 keeps norms, softmax and the residual stream "
                        "in float32; int8-weight and int4 are 8- and 4-bit weights (MatMulNBits, int8 compute); "
                        "int8-dynamic quantizes activations per call (MatMulInteger). A converted bundle must keep "
                        "top-1 agreement and perplexity on held-out text within stated thresholds. Default: fp32")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=NBITS_BLOCK_SIZE,
                   help=f"MatMulNBits block along K for int8-weight and int4 (default {NBITS_BLOCK_SIZE})")
    p.add_argument("--grid", choices=GRIDS, default="gguf",
                   help="int4: weights already on a GGUF 4/8-bit grid are re-encoded exactly (gguf, default) or rounded "
                        "to a new symmetric 4-bit grid as onnxruntime-genai does (rtn: faster, less faithful)")
    p.add_argument("--head-bits", type=int, choices=HEAD_BITS, default=None,
                   help="int4: bits of the embedding and LM heads (default: as the blocks; a GGUF Q8_0 table stays 8-bit; "
                        "4 halves the bytes the LM head reads per token). fp32: convert only the exit and final heads to "
                        "8- or 4-bit MatMulNBits (float32 blocks; the head is read at every token and every exit), "
                        "judged by the quality check instead of equality")
    p.add_argument("--head-refine", type=int, default=0, metavar="N",
                   help="8-bit LM heads (int4's, or fp32 with --head-bits 8) compute every logit from a 4-bit copy and "
                        "re-score the N best at 8 bits: the 8-bit head's choice for about the 4-bit head's cost "
                        "(64 is plenty on SmolLM2; default 0: off)")
    p.add_argument("--kv", choices=KV_DTYPES, default="float32",
                   help="KV cache type: int8 keeps keys and values as int8 with static scales calibrated on the bundled "
                        "TinyStories text (fused Llama blocks only; 0.25x the float32 bytes per token). Default: float32")
    p.add_argument("--kv-scaling", choices=KV_SCALINGS, default="per-channel",
                   help="int8 KV scales: one per layer, head and channel (default) or one per layer (per-tensor)")
    p.add_argument("--kv-margin", type=float, default=DEFAULT_MARGIN,
                   help=f"int8 KV scales cover this many times the calibrated max |key| / |value| (default {DEFAULT_MARGIN})")
    p.add_argument("--quantize-heads", action=argparse.BooleanOptionalAction, default=None,
                   help="convert the embedding and both heads to --precision too (default: yes for int4, no otherwise)")
    p.add_argument("--monolithic", action="store_true",
                   help="also write the whole model as one ONNX graph with KV cache (model.onnx), the baseline of `adainfer bench`")
    p.add_argument("--generic-blocks", action="store_true",
                   help="trace every block from PyTorch with standard ONNX operators only (for TensorRT, whose parser "
                        "lacks ONNX Runtime's fused GroupQueryAttention / RotaryEmbedding); default: Llama-layout "
                        "blocks use ONNX Runtime's fused CPU operators")
    p.add_argument("--calib", type=Path, default=None, metavar="DATA",
                   help="calibrate the early exit on this text file after export (the default model is calibrated "
                        "on its bundled TinyStories sample unless --no-calib)")
    p.add_argument("--no-calib", action="store_true", help="do not calibrate the default model")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        from .writer import default_bundle_dir, export  # torch loads here, after argument errors are reported

        model_dir = args.model_dir or DEFAULT_MODEL_DIR
        out = args.output or default_bundle_dir(model_dir)
        manifest = export(model_dir, out, force=args.force, verify=not args.no_verify, progress=not args.quiet, monolithic=args.monolithic,
                          precision=args.precision, quantize_heads=args.quantize_heads, fused=not args.generic_blocks,
                          block_size=args.block_size, grid=args.grid, head_bits=args.head_bits, head_refine=args.head_refine,
                          kv=args.kv, kv_scaling=args.kv_scaling, kv_margin=args.kv_margin)
        print(f"wrote {out}: {manifest.family} ({manifest.model_type}), {manifest.num_layers} blocks, "
              f"hidden {manifest.hidden_size}, vocab {manifest.vocab_size}")
        data = args.calib or (DEFAULT_CALIB_DATA if args.model_dir is None and not args.no_calib else None)
        if data is not None:
            from ..calib.calibrate import calibrate
            from ..commands.calib import format_report

            print(format_report(calibrate(out, data, progress=not args.quiet)))
        return 0

    return run_main("adainfer-export", body)


if __name__ == "__main__":
    sys.exit(main())
