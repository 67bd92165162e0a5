#!/usr/bin/env python3
"""Would a fused Q4_1 kernel close the int4 gap? Time an int4 bundle's full step with its Q4_1 groups as one
custom node each (`adainfer/runtime/q4_1_kernel.py`) against the step as exported and onnxruntime-genai's int4.

    python tools/q4_1_fused.py INT4_BUNDLE [--genai GENAI_INT4_DIR] [--threads 2] [--repeats 7] [--past 80]
                               [--json OUT]

The int4 export keeps a GGUF's Q4_1 weights exactly: MatMulNBits on q - 8 plus `blocksum(x) @ (m + 8 d)`
(Reshape, ReduceSum, MatMul, Add per projection group, `exporter/gguf_grid.py`). This compiles the
custom op (`adainfer/runtime/kernels/q4_1_matmul.c`) with the system C compiler, writes a copy of `full_step.onnx` whose groups are one
`adainfer.MatMulQ4_1` node reading the same initializers (beside the bundle's external data, deleted
afterwards), and times one decode step of each graph in plain ONNX Runtime sessions (interleaved rounds of
30 runs; the sessions' threads stop spinning after each run), as `tools/int4_offset_cost.py` does: the
kernel's gain at graph level, without the runtime (which runs such twins, `exporter/q4_1_twins.py`).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_offset_cost import arguments, report, rewritten_full_step, session, time_steps  # noqa: E402

from adainfer.exporter.q4_1_twins import fuse_q4_1  # noqa: E402
from adainfer.runtime.q4_1_kernel import build, cpu_is_fast  # noqa: E402

def main(argv=None) -> int:
    p = arguments(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    found = rewritten_full_step(args, fuse_q4_1, "Q4_1 groups")
    if found is None:
        return 2
    source, model, groups = found
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
    report(args, load, times, f"{groups} Q4_1 groups fused", {"fused_groups": groups})
    return 0


if __name__ == "__main__":
    sys.exit(main())
