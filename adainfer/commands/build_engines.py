"""`adainfer build-engines BUNDLE`: TensorRT engines for this GPU, or just the trtexec recipes.

Engines go to BUNDLE/engines/<gpu>_trt<version>/ with engine.json, the timing cache and
trtexec.sh; `--recipes-only` writes only trtexec.sh (into BUNDLE/engines/recipes/, or --out)
and needs neither a GPU nor TensorRT.
"""

from __future__ import annotations

from pathlib import Path

NAME = "build-engines"


def register(sub) -> None:
    p = sub.add_parser(NAME, help="build TensorRT engines for this GPU (or write trtexec recipes)", description=__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--max-seq", type=int, default=None, help="longest prompt (default: min(256, max context))")
    p.add_argument("--max-context", type=int, default=None, help="longest prompt + generation (default: the model's positions)")
    p.add_argument("--workspace-mib", type=int, default=1024)
    p.add_argument("--calib-text", type=Path, default=None, help="int8: UTF-8 text to calibrate on (default: the model's own text)")
    p.add_argument("--recipes-only", action="store_true", help="write trtexec.sh only (no GPU needed)")
    p.add_argument("--out", type=Path, default=None, help="with --recipes-only: directory for trtexec.sh")


def main(args) -> int:
    from ..engines.profiles import BuildOptions
    from ..runtime.bundle import open_bundle

    options = BuildOptions(precision=args.precision, max_batch=args.max_batch, max_seq=args.max_seq,
                           max_context=args.max_context, workspace_mib=args.workspace_mib)
    if args.recipes_only:
        from ..engines.recipes import write_recipes

        bundle = open_bundle(args.bundle, check_digests=False)
        out = args.out if args.out is not None else args.bundle / "engines" / "recipes"
        # the script refers to the ONNX files relative to itself: ../../ under BUNDLE/engines/<dir>/
        path = write_recipes(args.bundle, bundle.manifest, options.resolved(bundle.manifest), out)
        print(f"wrote {path}")
        return 0
    from ..engines.build import build_engines

    build_engines(args.bundle, options, calib_text=args.calib_text)
    return 0
