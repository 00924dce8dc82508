"""Run the fmtl command line as if the ray extra were not installed (ray and pyarrow cannot be imported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HIDE_RAY = """
import sys

class HideRay:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "pyarrow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, HideRay())
from fmtl.cli import main
main()
"""


def fmtl_without_ray(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``fmtl ARGV`` in a subprocess that cannot import ray; its output captured as text."""
    return subprocess.run([sys.executable, "-c", HIDE_RAY, *argv], cwd=cwd, capture_output=True, text=True, timeout=60)
