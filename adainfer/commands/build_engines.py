"""`adainfer build-engines BUNDLE`: TensorRT engines for this GPU, or just the trtexec recipes.

Engines go to BUNDLE/engines/<gpu>_trt<version>/ with engine.json, the timing cache and
trtexec.sh; `--recipes-only` writes only trtexec.sh (into BUNDLE/engines/recipes/, or --out)
and needs neither a GPU nor TensorRT. Engines are strongly typed: their precision is the
bundle's (export with --precision fp16 for fp16 engines; int8 needs Q/DQ graphs).
"""

from __future__ import annotations

from pathlib import Path

NAME = "build-engines"


def register(sub) -> None:
    p = sub.add_parser(NAME, help="build TensorRT engines for this GPU (or write trtexec recipes)", description=__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="check that the bundle's graphs have this precision (default: take the bundle's)")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--max-seq", type=int, default=None, help="longest prompt (default: min(256, max context))")
    p.add_argument("--max-context", type=int, default=None, help="longest prompt + generation (default: the model's positions)")
    p.add_argument("--workspace-mib", type=int, default=1024)
    p.add_argument("--recipes-only", action="store_true", help="write trtexec.sh only (no GPU needed)")
    p.add_argument("--out", type=Path, default=None, help="with --recipes-only: directory for trtexec.sh")


def main(args) -> int:
    from ..engines.precision import engine_precision
    from ..engines.profiles import BuildOptions
    from ..runtime.bundle import open_bundle

    options = BuildOptions(precision=args.precision, max_batch=args.max_batch, max_seq=args.max_seq,
                           max_context=args.max_context, workspace_mib=args.workspace_mib)
    if args.recipes_only:
        from dataclasses import replace

        from ..engines.recipes import write_recipes

        bundle = open_bundle(args.bundle, check_digests=False)
        options = replace(options, precision=engine_precision(args.bundle, bundle.manifest, args.precision))
        out = args.out if args.out is not None else args.bundle / "engines" / "recipes"
        # the script refers to the ONNX files relative to itself: ../../ under BUNDLE/engines/<dir>/
        path = write_recipes(args.bundle, bundle.manifest, options.resolved(bundle.manifest), out)
        print(f"wrote {path}")
        return 0
    from ..engines.build import build_engines

    build_engines(args.bundle, options)
    return 0
