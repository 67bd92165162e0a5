"""tools/gpu_selfcheck.py without a GPU: it refuses in one line without importing torch or
scikit-learn (the Jetson install has neither), and its rows fail when what they name did not happen."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import adainfer.runtime as rt
from adainfer.runtime.exit_policy import ExitPolicy
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_selfcheck  # noqa: E402

BLOCK = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "sklearn", "transformers"):
            raise ImportError("not installed on this Jetson: " + name)
sys.meta_path.insert(0, Block())
sys.argv = ["gpu_selfcheck.py", sys.argv[1]]
runpy.run_path(sys.argv[0].replace("gpu_selfcheck.py", "") + %r, run_name="__main__")
""" % str(ROOT / "tools" / "gpu_selfcheck.py")


def test_without_a_gpu_it_refuses_in_one_line_and_needs_no_torch(stories_bundle):
    out = subprocess.run([sys.executable, "-c", BLOCK, str(stories_bundle)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("gpu_selfcheck: error: no GPU backend could start here") and out.stderr.count("\n") == 1
    assert "tensorrt" in out.stderr and "ort-cuda" in out.stderr and out.stdout == ""


def test_rows_pass_on_a_backend_that_does_what_they_name(stories_bundle):
    cpu, model = rt.load(stories_bundle), rt.load(stories_bundle, backend="cpu-iobinding")
    rows, not_run = gpu_selfcheck.rows_for(cpu, model, "fp32")
    by_name = {r.check.split(",")[0].split(" (")[0]: r for r in rows}
    assert all(r.ok for r in rows), rows
    assert not_run == ["calibrated exit: the bundle has no exit policy (adainfer calib)"]  # listed, not passed
    assert by_name["forced exit after 2: exits"].value == "23/23"
    assert {"logits", "teacher-forced decode", "batch of 2", "speculative = full depth"} <= set(by_name)


def test_a_calibrated_exit_row_runs_and_counts_exits(stories_bundle, tmp_path):
    import shutil

    from adainfer.calib.calibrate import calibrate
    from adainfer.paths import DEFAULT_CALIB_DATA

    bundle = tmp_path / "b"
    shutil.copytree(stories_bundle, bundle)
    calibrate(bundle, DEFAULT_CALIB_DATA, limit=30, progress=False, kinds=("logreg",), variant="full-head")
    cpu = rt.load(bundle)
    row = gpu_selfcheck.calibrated_exit_row(cpu, rt.load(bundle, backend="cpu-iobinding"), shift=-4.0)
    assert row.ok and int(row.value.split()[0]) > 0, row
    none = gpu_selfcheck.calibrated_exit_row(cpu, rt.load(bundle, backend="cpu-iobinding"), shift=+1e6)
    assert not none.ok and none.value == "0 exits"  # a row where nothing exited fails


def test_an_exit_row_fails_when_no_token_exits(stories_bundle, monkeypatch):
    cpu = rt.load(stories_bundle)

    class NeverExits:  # a backend that silently runs full depth whatever the policy says
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def generate(self, *args, **kwargs):
            kwargs.update(mode="full", policy=None)
            return self.model.generate(*args, **kwargs)

    row = gpu_selfcheck.forced_exit_row(cpu, NeverExits(rt.load(stories_bundle)))
    assert not row.ok and row.value == "0/23"
    from test_engines import trt_on_ort

    refusal = gpu_selfcheck.speculative_row(cpu, trt_on_ort(stories_bundle))
    assert refusal.ok and refusal.value == "refused"
