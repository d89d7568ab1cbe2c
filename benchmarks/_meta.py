"""What every benchmark JSON records about its run: when, at which commit, on what, how loaded."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(script: str, argv: list[str] | None, load_before: float | None = None) -> dict:
    """Date (UTC), commit (``+dirty`` when tracked files differ), command line, CPU, Python and the
    1-minute load average at the start (``load_before``) and now."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
            "command": shlex.join(["python", f"benchmarks/{script}", *args]), "cpu": cpu_name(),
            "machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}
