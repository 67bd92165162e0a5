"""SmolLM2-135M-Instruct (the real model, fp32): the bundle stores its tied table once and its size
and `adainfer run`'s peak memory stay within issue 11's bounds. Speed is measured by
tools/chain_vs_genai.py (a benchmark, not a test)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx

from adainfer.exporter.shared_weights import SHARED_FILE
from adainfer.manifest import Manifest
from conftest import ROOT

#: measured 2026-11-22: bundle 544.1 MB for 538.1 MB of float32 parameters (1.011)
SIZE_RATIO_BOUND = 1.05
#: measured 2026-11-22: `adainfer run`, 16 new tokens, 785 MB; onnxruntime-genai fp32 on the same
#: generation 778 MB; the bound is 1.10 x genai's (tools/chain_vs_genai.py measures both)
PEAK_RSS_BOUND_MB = 1.10 * 778

RSS_SNIPPET = """
import sys
from adainfer.cli import main
code = main(sys.argv[1:])
peak = [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]
print('PEAK_MB', peak, code, file=sys.stderr)
"""


def _parameter_bytes(hf_dir) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            total += sum(int(np.prod(st.get_slice(k).get_shape(), dtype=np.int64)) * 4 for k in st.keys())
    return total


def test_bundle_is_its_parameters_once(smollm2_bundle, smollm2_hf_dir):
    manifest = Manifest.load(smollm2_bundle)
    size = sum((smollm2_bundle / spec.file).stat().st_size for spec in manifest.all_files().values())
    assert size <= SIZE_RATIO_BOUND * _parameter_bytes(smollm2_hf_dir), size
    table = 49152 * 576 * 4
    lengths = {}
    for name in ("embed", "exit_head", "final_head"):
        for t in onnx.load(str(smollm2_bundle / f"{name}.onnx"), load_external_data=False).graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            if int(info.get("length", 0)) == table:
                lengths[name] = (info["location"], info.get("offset"))
    assert len(lengths) == 3 and len(set(lengths.values())) == 1 and lengths["embed"][0] == SHARED_FILE
    ops = {n.op_type for n in onnx.load(str(smollm2_bundle / "block_07.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "RotaryEmbedding" in ops


def test_adainfer_run_peak_memory(smollm2_bundle):
    proc = subprocess.run([sys.executable, "-c", RSS_SNIPPET, "run", str(smollm2_bundle), "Once upon a time",
                           "--max-new-tokens", "16", "--no-stop-at-eos", "--threads", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    line = [l for l in proc.stderr.splitlines() if l.startswith("PEAK_MB")][-1].split()
    assert line[2] == "0" and proc.stdout.strip(), proc.stderr[-400:]
    assert float(line[1]) <= PEAK_RSS_BOUND_MB, line
