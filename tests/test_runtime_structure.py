"""The runtime's shape: one block loop, no module cycles, never the build-time `engines` package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "adainfer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(path: Path) -> set[str]:
    """Every adainfer module `path` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("adainfer")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("adainfer"):
                continue
            subs = [f"{target}.{a.name}" for a in node.names]
            subs = [m for m in subs if (ROOT / Path(*m.split("."))).with_suffix(".py").is_file()
                    or (ROOT / Path(*m.split("."))).is_dir()]
            found |= set(subs) if len(subs) == len(node.names) else {target, *subs}  # `from . import chain`: the submodule
    return found


def graph(paths) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in paths}
    return {m: {t for t in import_edges(p) if t in modules and t != m} for m, p in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def test_the_runtime_has_no_import_cycle_even_through_function_level_imports():
    edges = graph((PACKAGE / "runtime").rglob("*.py"))
    assert "adainfer.runtime.model" not in edges["adainfer.runtime.decoding"]
    assert cycles(edges) == []


def test_the_exporter_writer_and_monolithic_graph_do_not_import_each_other():
    edges = graph((PACKAGE / "exporter").rglob("*.py"))
    assert "adainfer.exporter.writer" not in edges["adainfer.exporter.monolithic"]
    assert not [c for c in cycles(edges) if "adainfer.exporter.monolithic" in c]


def test_the_runtime_never_imports_engines_in_its_source():
    for path in (PACKAGE / "runtime").rglob("*.py"):
        assert not [t for t in import_edges(path) if t.startswith("adainfer.engines")], path


def test_one_block_loop_in_the_runtime():
    """Only chain.py loops calling a block, segment (span of blocks) or kv_fill graph per layer."""
    loops = []
    for path in (PACKAGE / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.For, ast.While)):
                calls = {c.func.attr for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}
                if calls & {"block", "segment", "kv_fill"}:
                    loops.append((path.name, node.lineno))
    assert [name for name, _ in loops] == ["chain.py", "chain.py"], loops  # run_layers and fill_skipped


def test_loading_and_running_a_bundle_on_the_cpu_imports_no_engines_module(stories_bundle):
    code = """
import sys
import adainfer.runtime as rt
from adainfer.runtime.exit_policy import ExitPolicy
for backend in ("cpu", "cpu-iobinding"):
    model = rt.load(sys.argv[1], backend=backend)
    g = model.generate("Once upon a time", max_new_tokens=6, mode="early-exit", policy=ExitPolicy.forced(2))
    assert g.new_tokens == 6 and g.layers_per_token[1:] == [2] * 5, g
    model.generate("Once upon a time", max_new_tokens=6, mode="speculative", policy=ExitPolicy.forced(2))
    model.close()
print("imported:", sorted(m for m in sys.modules if m.startswith(("adainfer.engines", "adainfer.exporter", "adainfer.calib", "torch", "transformers", "sklearn"))))
"""
    out = subprocess.run([sys.executable, "-c", code, str(stories_bundle)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "imported: []" in out.stdout
