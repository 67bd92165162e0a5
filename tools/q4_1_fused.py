#!/usr/bin/env python3
"""Would a fused Q4_1 kernel close the int4 gap? Time an int4 bundle's full step with its Q4_1 groups as one
custom node each (`tools/q4_1_kernel/q4_1_matmul.c`) against the step as exported and onnxruntime-genai's int4.

    python tools/q4_1_fused.py INT4_BUNDLE [--genai GENAI_INT4_DIR] [--threads 2] [--repeats 7] [--past 80]
                               [--json OUT]

The int4 export keeps a GGUF's Q4_1 weights exactly: MatMulNBits on q - 8 plus `blocksum(x) @ (m + 8 d)`
(Reshape, ReduceSum, MatMul, Add per projection group, `exporter/gguf_grid.py`). This compiles the prototype
custom op with the system C compiler, writes a copy of `full_step.onnx` whose groups are one
`adainfer.MatMulQ4_1` node reading the same initializers (beside the bundle's external data, deleted
afterwards), and times one decode step of each graph in plain ONNX Runtime sessions (interleaved rounds of
30 runs; the sessions' threads stop spinning after each run), as `tools/int4_offset_cost.py` does. Not used
by the runtime: a measurement of what wiring such a kernel in would give.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_offset_cost import arguments, session, time_steps  # noqa: E402

KERNEL_DIR = Path(__file__).resolve().parent / "q4_1_kernel"
SOURCE = KERNEL_DIR / "q4_1_matmul.c"
FAST_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


def build(out_dir: Path, fast: bool = True) -> Path:
    """The custom-op library, compiled into `out_dir` (AVX2/FMA/F16C when `fast`, else plain C)."""
    library = out_dir / ("libq4_1_matmul.so" if fast else "libq4_1_matmul_plain.so")
    flags = ["-O3", "-fno-math-errno", "-shared", "-fPIC", f"-I{KERNEL_DIR}"] + (FAST_FLAGS if fast else [])
    subprocess.run([os.environ.get("CC", "cc"), *flags, str(SOURCE), "-o", str(library), "-lm"], check=True)
    return library


def cpu_is_fast() -> bool:
    """Whether this CPU runs the AVX2/FMA/F16C build (Linux; elsewhere: no)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= set(flags)


def fuse_q4_1(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with every Q4_1 group (MatMulNBits + offset MatMul + Add, and the block sums nobody else
    reads) replaced by one adainfer.MatMulQ4_1 on the same initializers; how many groups."""
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    fused, dropped = {}, set()
    for node in nodes:
        if not node.name.endswith("_add_offset"):
            continue
        nbits, offset = producer[node.input[0]], producer[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in nbits.attribute}
        if nbits.op_type != "MatMulNBits" or offset.op_type != "MatMul" or len(nbits.input) != 3 \
                or attrs["bits"] != 4 or attrs["block_size"] != 32:
            continue
        fused[node.name] = helper.make_node("MatMulQ4_1", [*nbits.input[:3], offset.input[1]], [node.output[0]],
                                            name=f"{nbits.name}_fused", domain="adainfer", K=attrs["K"], N=attrs["N"])
        dropped |= {nbits.name, offset.name}
    kept = [fused.get(n.name, n) for n in nodes if n.name not in dropped]
    while True:  # block sums and their reshapes that nothing reads any more
        read = {name for n in kept for name in n.input} | {o.name for o in model.graph.output}
        unused = [n for n in kept if n.op_type in ("Reshape", "ReduceSum") and not any(o in read for o in n.output)]
        if not unused:
            break
        kept = [n for n in kept if n not in unused]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if fused:
        model.opset_import.append(helper.make_opsetid("adainfer", 1))
    return model, len(fused)


def main(argv=None) -> int:
    p = arguments(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    source = args.bundle / "full_step.onnx"
    if not source.is_file():
        print(f"error: no full_step.onnx in {args.bundle}", file=sys.stderr)
        return 2
    model, groups = fuse_q4_1(onnx.load(str(source), load_external_data=False))
    if not groups:
        print(f"error: {source} has no Q4_1 groups (not an int4 bundle from a Q4_1 GGUF?)", file=sys.stderr)
        return 2
    if not cpu_is_fast():
        print("error: this CPU lacks AVX2/FMA/F16C, which the kernel's fast path needs", file=sys.stderr)
        return 2
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, tempfile.NamedTemporaryFile(suffix=".onnx", dir=args.bundle) as probe:
        library = build(Path(tmp))
        onnx.save(model, probe.name)
        sessions = {"full step": session(source, args.threads),
                    "fused Q4_1 kernel": session(Path(probe.name), args.threads, library)}
        if args.genai:
            sessions["onnxruntime-genai int4"] = session(args.genai / "model.onnx", args.threads)
    times = time_steps(sessions, args.past, args.repeats)
    medians = {name: median(v) for name, v in times.items()}
    print(f"{groups} Q4_1 groups fused; decode step after {args.past} positions, {args.threads} threads, "
          f"load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    genai = medians.get("onnxruntime-genai int4")
    for name, ms in medians.items():
        print(f"  {name:24s} {ms:6.2f} ms" + (f"  {ms / genai:.3f}x genai" if genai else ""))
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "fused_groups": groups, "past": args.past,
                                         "threads": args.threads, "load_before": load, "load_after": os.getloadavg(),
                                         "ms": times, "median_ms": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
