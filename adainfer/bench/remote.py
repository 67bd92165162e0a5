"""The parent's handle on one worker process (`worker.py`): start it, time through it, read its memory.

A worker that cannot import its peer reports "not installable" (the ImportError); one that fails
to load reports "failed": either way the contender stays in the table as a row with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """A worker hosting `spec["names"]`; `status` is "ok", "not installable" or "failed" (then `reason`)."""

    def __init__(self, spec: dict, python: Optional[str] = None, timeout: float = 900):
        self.spec, self.names = spec, list(spec["names"])
        self.python = python or sys.executable
        self.status, self.reason, self.baseline_mb = "ok", None, None
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        # torch's OpenMP threads busy-wait after each op by default, stealing cores from the next contender
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen([self.python, "-m", "adainfer.bench.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        except OSError as exc:
            self.proc, self.status, self.reason = None, "not installable", f"cannot start {self.python}: {exc}"
            return
        reply = self._ask(spec)
        if reply is None:
            self.status, self.reason = "failed", self._stderr_tail()
        elif "error" in reply:
            self.status = "not installable" if reply.get("not_installable") else "failed"
            self.reason = reply["error"]
            self.close()
        else:
            self.baseline_mb = reply["baseline_mb"]

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().splitlines() if line.strip()]
        return lines[-1] if lines else "the worker exited without a reply"

    def _ask(self, request: dict) -> Optional[dict]:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def request(self, request: dict) -> dict:
        reply = self._ask(request)
        if reply is None or "error" in reply:
            from .shapes import BenchError

            raise BenchError(f"worker {'+'.join(self.names)} failed: "
                             f"{reply['error'] if reply else self._stderr_tail()}")
        return reply

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._stderr.close()


class Remote:
    """One contender inside a worker, with the interface `measure.run` times."""

    def __init__(self, worker: Worker, name: str, layers):
        self.worker, self.name, self.layers = worker, name, layers

    def time_prefill(self, ids) -> float:
        return self.worker.request({"op": "prefill", "name": self.name, "ids": list(ids)})["seconds"]

    def time_decode(self, ids, tokens: int) -> float:
        return self.worker.request({"op": "decode", "name": self.name, "ids": list(ids), "tokens": tokens})["seconds"]

    def info(self) -> dict:
        return self.worker.request({"op": "info", "name": self.name})
