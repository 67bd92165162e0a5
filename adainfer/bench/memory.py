"""Peak resident memory of one contender, measured in a fresh process (`python -m adainfer.bench.memory`).

The process imports what the contender needs, records its resident set (`baseline`), loads the
contender, prefills the longest prompt, decodes the tokens, and reports its high-water mark VmHWM (`peak`):
what a user's process running only that contender would hold at most.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process (its own address space: unlike `ru_maxrss`, not inherited
    from the forking parent across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: kB on most systems


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def measure_in_subprocess(contender: str, bundle: Path, threads: int, prompt: list[int], tokens: int,
                          timeout: float = 600) -> dict:
    """{"baseline_mb", "peak_mb", "peak_over_baseline_mb"} of `contender` in a child process."""
    cmd = [sys.executable, "-m", "adainfer.bench.memory", contender, str(bundle), "--threads", str(threads),
           "--tokens", str(tokens), "--prompt", ",".join(map(str, prompt))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        from .shapes import BenchError

        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"memory measurement of {contender} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adainfer.bench.memory")
    p.add_argument("contender")
    p.add_argument("bundle", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", required=True)
    args = p.parse_args(argv)
    prompt = [int(t) for t in args.prompt.split(",")]
    if args.contender == "transformers":
        import torch  # noqa: F401  (imports before the baseline)
        import transformers  # noqa: F401
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401

    from .contenders import build

    baseline = _rss_mb()
    contender = build(args.contender, args.bundle, args.threads)
    state, token = contender.prefill(prompt)
    for _ in range(args.tokens):
        token = contender.step(state, token)
    peak = _peak_mb()
    print(json.dumps({"baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
                      "peak_over_baseline_mb": round(peak - baseline, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
