"""The peers a user would run instead, prepared once into the bench cache: onnxruntime-genai's builds.

onnxruntime-genai ships a model builder (`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT
-p fp32|int4 -e cpu`) that turns the same float32 Hugging Face directory into its own ONNX model
(fused GroupQueryAttention, MatMulNBits int4 with block 32 and accuracy level 4). It runs with
the interpreter given for peers (`--peer-python`, default this one); when that interpreter lacks
the package the build is reported "not installable" with the reason. llama.cpp needs no build:
it runs the GGUF file itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Optional

STAMP = "adainfer_source.json"


class PeerUnavailable(Exception):
    """A peer cannot be prepared: `status` is "not installable" or "failed", the message says why."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


def genai_build(source: dict, hf_dir: Path, precision: str, cache_dir: Path, python: str,
                progress: bool = True, timeout: float = 1800) -> Path:
    """onnxruntime-genai's build of `hf_dir` at `precision` (fp32 | int4), cached per source."""
    out = Path(cache_dir) / f"genai-{source['name']}-{precision}"
    stamp = {"source": source.get("sha256") or source, "precision": precision}
    if (out / "genai_config.json").is_file() and (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == stamp:
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"building onnxruntime-genai {precision} of {source['name']} into {out}", flush=True)
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(staging), "-p", precision,
           "-e", "cpu", "-c", str(staging) + ".hf-cache"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable("failed", f"onnxruntime-genai builder: {exc}") from None
    finally:
        shutil.rmtree(str(staging) + ".hf-cache", ignore_errors=True)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no output"]
        missing = next((line for line in reversed(lines) if line.startswith(("ModuleNotFoundError", "ImportError"))), None)
        if missing is not None:
            raise PeerUnavailable("not installable", missing.split(":", 1)[-1].strip() + f" (python: {python})")
        raise PeerUnavailable("failed", f"onnxruntime-genai builder: {lines[-1]}")
    (staging / STAMP).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def size_on_disk(paths) -> int:
    """Bytes of the given files and of every file under the given directories."""
    total = 0
    for path in map(Path, paths):
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total


def module_missing(python: str, module: str) -> Optional[str]:
    """None when `python` can import `module`, else the reason."""
    try:
        proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["import failed"]
    return lines[-1].split(":", 1)[-1].strip() + f" (python: {python})"
