"""Shared by the benchmark scripts: the machine, the command line as run, one BENCHMARKS.md section."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = "# Benchmarks\n\nMeasured numbers of marvin-compile; each section is rewritten by its script.\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def command_line() -> str:
    """The command as run, with the script path relative to the repository when possible."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = sys.argv[0]
    return shlex.join([".venv/bin/python", script_text, *sys.argv[1:]])


def write_section(path: Path, name: str, text: str) -> None:
    """Replace section ``name`` of ``path`` (text includes its markers); append it when missing."""
    begin, end = markers(name)
    old = path.read_text() if path.exists() else HEADER
    start, stop = old.find(begin), old.find(end)
    if 0 <= start < stop:
        new = old[:start] + text + old[stop + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = path.with_name(f".{path.name}.{name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def machine() -> str:
    """CPU model name and core count from ``lscpu`` (falls back to os.cpu_count)."""
    info: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    model = info.get("Model name", "unknown CPU")
    try:
        cores = int(info["Core(s) per socket"]) * int(info.get("Socket(s)", "1"))
    except (KeyError, ValueError):
        cores = os.cpu_count() or 0
    return f"{model}, {cores} cores ({info.get('CPU(s)', os.cpu_count())} logical CPUs)"


# TVM's thread pool may pin the calling thread to CPU 0 on its first use (TVM_BIND_THREADS, with
# MaxConcurrency = cores / 2); the other engines are timed with the affinity the process started with.
START_AFFINITY = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def restore_affinity() -> bool:
    """Undo TVM's pinning of this thread; True when it had been narrowed."""
    if START_AFFINITY is None or os.sched_getaffinity(0) == START_AFFINITY:
        return False
    os.sched_setaffinity(0, START_AFFINITY)
    return True


def busy_cpu_s() -> float | None:
    """Busy CPU seconds of the whole machine so far, from /proc/stat (None where unavailable)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
