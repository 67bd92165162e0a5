"""The runtime must run where torch and transformers are not installed (a Jetson, a small container)."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
import adainfer.runtime as rt
model = rt.load(sys.argv[1])
result = model.generate("Once upon a time", max_new_tokens=8)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"heavy": heavy, "tokens": result.tokens}))
"""

BLOCKER = """
import sys

import pytest
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_loads_neither_torch_nor_transformers(stories_bundle):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(stories_bundle)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    assert len(result["tokens"]) == 8


def test_runtime_runs_with_torch_unimportable(stories_bundle):
    out = subprocess.run([sys.executable, "-c", BLOCKER + SCRIPT, str(stories_bundle)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["heavy"] == []


def test_cli_run_with_torch_unimportable(stories_bundle):
    code = BLOCKER + "import sys; from adainfer.cli import main; sys.exit(main(['run', sys.argv[1], 'Once upon a time', '--json', '--max-new-tokens', '4']))"
    out = subprocess.run([sys.executable, "-c", code, str(stories_bundle)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["new_tokens"] == 4


# ------------------------------------------------------------------ early exit and speculative decoding

DECIDING = """
import json, sys
import adainfer.runtime as rt
out = {}
for bundle in sys.argv[1:]:
    model = rt.load(bundle)
    for mode in ("early-exit", "speculative"):
        g = model.generate("Once upon a time", max_new_tokens=8, mode=mode, stop_at_eos=False)
        out[bundle + " " + mode] = {"tokens": g.tokens, "layers": g.layers_per_token, "decision": model.decider().policy.decision}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"heavy": heavy, "runs": out}))
"""


@pytest.fixture(scope="module")
def decider_bundles(stories_bundle, tmp_path_factory):
    """stories260K with a hand-made exit of each kind the runtime executes with ONNX graphs: a skl2onnx
    classifier and a folded exit head (score = gap - 0.5), both firing where the gap is >= ~0.5, which
    the first blocks of this model often are: the decision code really runs and tokens exit early."""
    import shutil

    import numpy as np

    from adainfer.calib.head_graphs import fold_linear
    from conftest import make_classifier, put_policy

    root = tmp_path_factory.mktemp("deciders")
    classifier, folded = root / "classifier", root / "folded"
    for path in (classifier, folded):
        shutil.copytree(stories_bundle, path)
    put_policy(classifier, {"decision": "classifier", "features": ["gap", "top_prob"], "threshold": 0.5, "head": "full",
                            "classifier_file": "classifier.onnx", "score_output": 1, "score_column": 1},
               {"classifier.onnx": make_classifier(2)}, attach=("classifier.onnx",))
    fold_linear(folded / "exit_head.onnx", root / "exit_head_folded.onnx", np.array([1.0, 0.0]), np.zeros(0), -0.5)
    put_policy(folded, {"decision": "folded", "features": ["gap", "top_prob"], "threshold": 0.0, "head": "full",
                        "head_file": "exit_head_folded.onnx"},
               {"exit_head_folded.onnx": (root / "exit_head_folded.onnx").read_bytes()}, attach=("exit_head_folded.onnx",))
    return [classifier, folded]


def test_early_exit_and_speculative_run_with_torch_unimportable(decider_bundles, stories_bundle):
    """Both deciders, both modes, in a process where importing torch or transformers raises."""
    import adainfer.runtime as rt

    out = subprocess.run([sys.executable, "-c", BLOCKER + DECIDING, *map(str, decider_bundles)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    full = rt.load(stories_bundle).generate("Once upon a time", max_new_tokens=8, stop_at_eos=False).tokens
    decisions = set()
    for key, run in result["runs"].items():
        decisions.add(run["decision"])
        assert len(run["tokens"]) == 8, key
        if key.endswith("speculative"):
            assert run["tokens"] == full, key  # lossless
        else:
            assert min(run["layers"][1:]) < 5, key  # tokens did exit early: the decider ran
    assert decisions == {"classifier", "folded"}
