"""Write a benchmark's table under benchmarks/results/ with where, when and how it was measured.

A results file is the only place a figure in README.md or docs/ may come from: it names the machine
(CPU model, cores), the date and the exact command that regenerates it, so a reader can check it by
running that command. Benchmarks call ``write_results`` when given ``--report``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> int:
    """The cores this process may run on (taskset and cgroup CPU sets count, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> str:
    return (
        f"{cpu_model()}, {cores()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )


def command() -> str:
    """The command line that ran this benchmark, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def write_results(name: str, title: str, body: str, versions: str = "", note: str = "") -> Path:
    """Write ``benchmarks/results/NAME.md``: a title, the provenance lines, an optional note, then ``body``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {title}",
        "",
        f"- machine: {machine()}" + (f"; {versions}" if versions else ""),
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} (UTC)",
        f"- command: `{command()}`",
        "",
        *([note, ""] if note else []),
        body.rstrip(),
        "",
    ]
    path = RESULTS / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    print(f"wrote {path.relative_to(RESULTS.parents[1])}")
    return path
