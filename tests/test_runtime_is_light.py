"""The runtime must run where torch and transformers are not installed (a Jetson, a small container)."""

import json
import subprocess
import sys

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
