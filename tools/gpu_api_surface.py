#!/usr/bin/env python3
"""Does every TensorRT and cuda-python name adainfer uses exist in the versions it supports? No GPU needed.

    python tools/gpu_api_surface.py [--cache DIR] [--json OUT]

TensorRT: downloads the bindings wheels of both ends of the supported range
(`tensorrt_cu12_bindings==10.3.0`, JetPack 6's version, and `tensorrt_cu13_bindings==11.4.0.106`,
~1.2 MB each, `pip download --no-deps` into DIR, default /tmp/adainfer-gpu-api), and reads the
names in their `tensorrt.so` without loading it (pybind11 keeps every Python name as a string in
the library) plus what their `__init__.py` defines (`nptype`, `__version__`). cuda-python: installs
`cuda-python<13` and `cuda-python>=13,<14` each into its own venv under DIR (they import without a
GPU) and looks every name up with getattr.

The names come from the code, not from a list: every attribute chain on `trt` (`trt.Logger.WARNING`),
every method or property used on a TensorRT object (builder, config, network, parser, profile,
engine, context, runtime, timing cache) in build.py and backends/tensorrt.py, and every chain on
the cuda-python runtime module in cuda_rt.py (`rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice`).
Prints a table; exits 1 when a name is missing from a supported version.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRT_WHEELS = {"10.3": "tensorrt_cu12_bindings==10.3.0", "11.4": "tensorrt_cu13_bindings==11.4.0.106"}
CUDA_PYTHON = {"12.x": "cuda-python>=12.0,<13", "13.x": "cuda-python>=13,<14"}
#: where TensorRT objects are handled: file -> the classes / functions there, and the variables
#: (or `self.` attributes) in them that hold TensorRT objects
TRT_SOURCES = {
    "adainfer/engines/build.py": (("TrtBuilder", "strongly_typed_network", "trt_profile"),
                                  {"builder", "config", "network", "parser", "p", "cache", "self.builder"}),
    "adainfer/runtime/backends/tensorrt.py": (("Engine", "run_context", "load_engines"),
                                              {"context", "runtime", "self.engine"}),
    "adainfer/runtime/cuda_rt.py": (("device_info",), set()),
}
CUDA_SOURCES = ("adainfer/runtime/cuda_rt.py",)


def _chain(node) -> list[str]:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        names.append(node.func.id + "()")
    else:
        return []
    return names[::-1]


def tensorrt_names(root: Path = ROOT) -> dict[str, str]:
    """name -> first place used: `trt.*` chains and attributes of TensorRT objects."""
    used: dict[str, str] = {}
    for rel, (scopes, objects) in TRT_SOURCES.items():
        tree = ast.parse((root / rel).read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in scopes]
        assert len(defs) == len(scopes), f"{rel}: expected {scopes}"
        for node in (n for d in defs for n in ast.walk(d)):
            if not isinstance(node, ast.Attribute):
                continue
            chain = _chain(node)
            if chain[:1] == ["trt"]:
                for name in chain[1:]:
                    used.setdefault(name, f"{rel}:{node.lineno}")
            elif len(chain) == 2 and chain[0] in objects:
                used.setdefault(chain[1], f"{rel}:{node.lineno}")
            elif len(chain) == 3 and ".".join(chain[:2]) in objects:
                used.setdefault(chain[2], f"{rel}:{node.lineno}")
    return used


def cuda_names(root: Path = ROOT) -> dict[str, str]:
    """dotted chain after the runtime module -> first place used (`rt.X.Y`, `cudart().X`)."""
    used: dict[str, str] = {}
    for rel in CUDA_SOURCES:
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if isinstance(node, ast.Attribute):
                chain = _chain(node)
                if chain and chain[0] in ("rt", "cudart()") and len(chain) >= 2:
                    outer = ".".join(chain[1:])
                    used = {k: v for k, v in used.items() if not outer.startswith(k + ".")}  # keep the longest
                    if not any(k.startswith(outer + ".") or k == outer for k in used):
                        used[outer] = f"{rel}:{node.lineno}"
    return used


class WheelNames:
    """The Python names of a TensorRT bindings wheel: the strings of its tensorrt.so and what its
    __init__.py defines. The linker merges a string into the tail of a longer one ("INPUT" is the
    end of "CONDITIONAL_INPUT"), so a name is there when some NUL-terminated string ends with it."""

    def __init__(self, wheel: Path):
        self.library, self.python = b"", set()
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if re.search(r"tensorrt[^/]*\.so$", member):
                    self.library += z.read(member)
                elif member.endswith("__init__.py"):
                    for node in ast.walk(ast.parse(z.read(member).decode())):
                        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                            self.python.add(node.name)
                        elif isinstance(node, ast.Assign):
                            self.python |= {t.id for t in node.targets if isinstance(t, ast.Name)}

    def __contains__(self, name: str) -> bool:
        return name in self.python or name.encode() + b"\x00" in self.library


def download(requirement: str, cache: Path) -> Path:
    name, version = requirement.split("==")
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                        "3.11", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "-q", "-d", str(cache), requirement], check=True, capture_output=True)
        found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    return found[0]


def cuda_python_check(requirement: str, cache: Path, chains: list[str]) -> tuple[str, dict[str, bool]]:
    """(installed version, chain -> exists) from a venv of its own under `cache`."""
    venv = cache / ("venv-" + re.sub(r"[^A-Za-z0-9]+", "_", requirement))
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], check=True, capture_output=True)
    probe = """
import json, sys
from importlib import metadata
try:
    from cuda.bindings import runtime as rt
except ImportError:
    from cuda import cudart as rt
def has(chain):
    obj = rt
    for name in chain.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True
print(json.dumps([metadata.version("cuda-python"), {c: has(c) for c in json.loads(sys.argv[1])}]))
"""
    out = subprocess.run([str(python), "-c", probe, json.dumps(chains)], check=True, capture_output=True, text=True)
    version, found = json.loads(out.stdout)
    return version, found


def surface(cache: Path) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    trt_used, cuda_used = tensorrt_names(), cuda_names()
    result = {"tensorrt": {}, "cuda-python": {}, "missing": []}
    for label, requirement in TRT_WHEELS.items():
        names = WheelNames(download(requirement, cache))
        found = {n: n in names for n in sorted(trt_used)}
        result["tensorrt"][label] = {"wheel": requirement, "found": found}
        result["missing"] += [f"tensorrt {label}: {n} ({trt_used[n]})" for n, ok in found.items() if not ok]
    for label, requirement in CUDA_PYTHON.items():
        version, found = cuda_python_check(requirement, cache, sorted(cuda_used))
        result["cuda-python"][label] = {"version": version, "found": found}
        result["missing"] += [f"cuda-python {version}: {n} ({cuda_used[n]})" for n, ok in found.items() if not ok]
    result["used"] = {"tensorrt": trt_used, "cuda-python": cuda_used}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/adainfer-gpu-api"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = surface(args.cache)
    columns = [("tensorrt", k) for k in TRT_WHEELS] + [("cuda-python", k) for k in CUDA_PYTHON]
    print(f"{'name':<52} " + " ".join(f"{p} {k}".ljust(16) for p, k in columns))
    for package in ("tensorrt", "cuda-python"):
        for name, where in sorted(result["used"][package].items()):
            marks = []
            for p, k in columns:
                marks.append(("ok" if result[p][k]["found"][name] else "MISSING") if p == package else "")
            print(f"{package[:4]} {name:<47} " + " ".join(m.ljust(16) for m in marks))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["missing"]:
        print("\nmissing: " + "; ".join(result["missing"]))
        return 1
    versions = ", ".join(f"cuda-python {v['version']}" for v in result["cuda-python"].values())
    print(f"\nevery name is in TensorRT {', '.join(TRT_WHEELS)} and {versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
