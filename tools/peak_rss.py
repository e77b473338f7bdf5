"""Run a Python module as __main__ and report this process's peak resident set size.

    python -m tools.peak_rss REPORT_FILE ggufjac.cli jacobian MODEL ...

At exit, VmHWM (the peak RSS of this process image, from /proc/self/status) is written to
REPORT_FILE in bytes. Unlike a parent's wait4() figure, VmHWM is not inflated by the
memory of the process that started us (Linux carries ru_maxrss across fork + exec).
"""

from __future__ import annotations

import atexit
import json
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM, VmRSS, RssFile, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    return status_bytes("VmHWM")


def measure_module(module: str, *args: str) -> dict:
    """Run `python -m module args` in a fresh process under this wrapper: the JSON object on
    the last line of its stdout, with "peak" (its peak RSS in bytes) added."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as report:
        out = subprocess.run([sys.executable, "-m", "tools.peak_rss", report.name, module,
                              *args], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["peak"] = int(Path(report.name).read_text())
    return result


def main() -> None:
    report, module, *args = sys.argv[1:]

    def write() -> None:
        with open(report, "w") as f:
            f.write(str(peak_rss_bytes()))
    atexit.register(write)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
