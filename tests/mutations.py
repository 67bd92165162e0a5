"""Mutation checks: each mutation breaks one thing in a *copy* of the package, and the tests named
for it must fail. The working tree is never modified.

    python tests/mutations.py              # all, prints a markdown table (tests/MUTATIONS.md has the last run)
    python tests/mutations.py NAME ...     # some

A mutation is "caught" when pytest exits 1 (a test failed) within its time limit; a timeout counts
as caught only for mutations marked so (none are: a test that hangs instead of failing is a defect).
Not run by pytest (the file name does not start with `test_`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "tests/test_hostile_inputs.py::test_hostile_input"

# name, file, old text, new text, tests that must fail, what it breaks
MUTATIONS = [
    ("user-errors-exit-1", "adainfer/cli_common.py", "EXIT_USER_ERROR = 2", "EXIT_USER_ERROR = 1",
     ["tests/test_errors.py::test_bundle_missing_directory"], "every user error exits 1 instead of 2"),
    ("calibration-never-exits", "adainfer/calib/simulate.py",
     "return max(ok, key=lambda o: (o.flops_saved, o.threshold)) if ok else outcomes[-1]", "return outcomes[-1]",
     ["tests/test_calib.py::test_calibration_exits_early_where_the_model_can"],
     "calibration always picks the threshold that never exits"),
    ("decider-never-stops", "adainfer/runtime/exit_policy.py",
     "return Decision(stop=bool(first >= threshold)", "return Decision(stop=False",
     ["tests/test_calib.py::test_heldout_agreement_meets_target",
      "tests/test_runtime_is_light.py::test_early_exit_and_speculative_run_with_torch_unimportable"],
     "the runtime's decider never stops early"),
    ("rollback-never-counted", "adainfer/runtime/decoding.py", "                self.rejected_rounds += 1",
     "                pass", ["tests/test_generation.py::test_rollback_leaves_the_full_depth_cache"],
     "no rejected round is ever seen (the rollback test used to loop forever)"),
    ("acceptance-rate-always-1", "adainfer/runtime/decoding.py",
     "return self.accepted / self.drafted if self.drafted else 0.0", "return 1.0",
     ["tests/test_generation.py::test_speculative_sampling_runs_and_is_seeded"], "reported acceptance rate is wrong"),
    ("int8-weight-at-4-bits", "adainfer/exporter/quantize.py", "bits=8", "bits=4",
     ["tests/test_quantization.py::test_int8_greedy_generation_runs[int8-weight]",
      "tests/test_quantization.py::test_quantized_kv_fill_keeps_early_exit_generation_close[int8-weight]"],
     "int8-weight quantizes to 4 bits (tokens drift after a few, kv_fill error grows)"),
    ("torch-imported-when-deciding", "adainfer/runtime/early_exit.py",
     "    def decide(self, layer: int, hidden_last: np.ndarray, previous: np.ndarray) -> Decision:\n",
     "    def decide(self, layer: int, hidden_last: np.ndarray, previous: np.ndarray) -> Decision:\n        import torch  # noqa\n",
     ["tests/test_runtime_is_light.py::test_early_exit_and_speculative_run_with_torch_unimportable"],
     "the early-exit step imports torch"),
    ("torch-imported-when-drafting", "adainfer/runtime/decoding.py",
     "        state = self.state.fork()\n", "        import torch  # noqa\n        state = self.state.fork()\n",
     ["tests/test_runtime_is_light.py::test_early_exit_and_speculative_run_with_torch_unimportable"],
     "speculative drafting imports torch"),
    # the defects of issue 14, put back one at a time
    ("symlink-replaced", "adainfer/atomic.py", "    if target.is_symlink():\n        return Path(os.path.realpath(target))\n",
     "", ["tests/test_atomic.py::test_writes_through_a_symlinked_bundle_path_keep_the_link"],
     "a staged write replaces a symlinked bundle path with a plain directory"),
    ("external-data-unchecked", "adainfer/runtime/bundle.py",
     "    check_external_data(root, manifest)", "    pass",
     [f"{HOSTILE}[bundle: graph uses external data the manifest does not list]"],
     "external-data files the manifest does not list are loaded"),
    ("policy-files-not-confined", "adainfer/runtime/early_exit.py", "    check_policy_files(policy, model.manifest)\n", "",
     [f"{HOSTILE}[policy: head_file is a block graph]"], "a policy may name any bundle file"),
    ("decider-sessions-unchecked", "adainfer/runtime/early_exit.py", "        check_decider_sessions(self)\n", "",
     [f"{HOSTILE}[policy: classifier of the wrong input width]"], "classifier width and outputs are not checked"),
    ("policy-values-unchecked", "adainfer/runtime/exit_policy.py", "        check_policy_values(self)\n", "",
     [f"{HOSTILE}[policy: threshold NaN]"], "a NaN threshold is accepted"),
    ("evidence-rule-off", "adainfer/calib/calibrate.py", "    check_evidence(len(held.gap), target)\n", "",
     [f"{HOSTILE}[calib: two short documents cannot support the target]"],
     "a calibration on two short documents replaces the policy"),
    ("holdout-unchecked", "adainfer/calib/options.py", '    check_fraction("--holdout", holdout)', "    pass",
     [f"{HOSTILE}[calib: holdout 1.5]"], "--holdout 1.5 trains on nothing"),
    ("tokenizer-size-unchecked", "adainfer/exporter/tokenizer_check.py", "    if size > vocab_size:", "    if False:",
     [f"{HOSTILE}[export: tokenizer larger than the model's vocabulary]"], "a 612-token tokenizer for a 512 vocabulary"),
    ("step-truncates-floats", "adainfer/runtime/limits.py", "    if _is_int(next_ids):\n        return [int(next_ids)]\n    return token_ids(next_ids)",
     "    return [int(i) for i in next_ids]", [f"{HOSTILE}[api: step 2.7 (no silent truncation)]"],
     "step([2.7]) decodes token 2"),
    ("tiny-temperature-overflows", "adainfer/runtime/sampling.py",
     "softmax((logits.astype(np.float64) - np.max(logits)) / temperature)", "softmax(logits / temperature)",
     [f"{HOSTILE}[run: temperature 1e-38 (tiny but valid: as good as greedy)]"], "--temperature 1e-38 gives NaN probabilities"),
    ("closed-stdout-unhandled", "adainfer/cli_common.py", "    if sys.stdout is None:", "    if False:",
     [f"{HOSTILE}[run: stdout closed]"], "`adainfer run ... >&-` ends in a traceback"),
]


def run(name: str, path: str, old: str, new: str, tests: list, timeout: int = 900) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        # a whole copy, run from there: `python -m` puts the working directory first on sys.path, so the
        # tests (and the CLI subprocesses they start) import the mutant, never the working tree
        for item in ("adainfer", "tests"):
            shutil.copytree(ROOT / item, Path(tmp) / item, ignore=shutil.ignore_patterns("__pycache__"))
        for item in ("README.md", "pyproject.toml"):
            shutil.copy(ROOT / item, Path(tmp) / item)
        target = Path(tmp) / path
        text = target.read_text()
        if old not in text:
            return "NOT APPLIED (text not found)", 0.0, ""
        target.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": tmp}
        started = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=tmp,
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "MISSED (timed out)", time.time() - started, ""
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        verdict = {0: "MISSED (tests passed)", 1: "caught"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
        if proc.returncode == 1 and " failed" not in summary:  # only errors (a fixture broke): not evidence
            verdict = "undecided (a fixture failed, no test ran)"
        return verdict, time.time() - started, summary


def main(names: list) -> int:
    chosen = [m for m in MUTATIONS if not names or m[0] in names]
    print("| mutation | what it breaks | file | caught by | result |")
    print("|---|---|---|---|---|")
    missed = 0
    for name, path, old, new, tests, what in chosen:
        verdict, seconds, summary = run(name, path, old, new, tests)
        missed += verdict != "caught"
        shown = "<br>".join(f"`{t.split('::', 1)[1]}`" for t in tests)
        print(f"| {name} | {what} | `{path}` | {shown} | {verdict} ({seconds:.0f} s: {summary}) |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
