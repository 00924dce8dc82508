"""The layers are enforced: spec/errors/atomic <- runtime <- training <- cli/train.

`lint-imports` checks the contracts of pyproject.toml ([tool.importlinter]) on the tree as it is, and each
contract is shown to fail on a scratch copy of the package with one deliberate violation, so a contract
that can no longer break (a renamed module, a typo in a name) fails here instead of passing silently.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess:
    args = [str(LINT_IMPORTS), "--no-cache", *(a for c in contracts for a in ("--contract", c))]
    return subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_contract():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


# (file under fmtl/, line appended to it, the contract it must break)
VIOLATIONS = [
    ("runtime/images.py", "import torch", "torch-free-runtime"),
    ("runtime/infer.py", "def _late():\n    import accelerate", "torch-free-runtime"),
    ("runtime/infer.py", "from fmtl.training import config", "layers"),
    ("spec.py", "import numpy", "contract"),
    ("atomic.py", "from fmtl.runtime import images", "contract"),
    ("training/metrics.py", "from fmtl import cli", "training-below-entry-points"),
    ("errors.py", "from fmtl import atomic", "no-cycles"),  # atomic imports errors: a circle
    ("extra.py", "import json", "layers"),  # a new top-level module belongs to no layer
]


@pytest.mark.parametrize(("path", "line", "contract"), VIOLATIONS, ids=[f"{v[2]}:{v[0]}" for v in VIOLATIONS])
def test_a_deliberate_violation_breaks_its_contract(tmp_path, path, line, contract):
    shutil.copytree(REPO / "fmtl", tmp_path / "fmtl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path, contract).returncode == 0, "the scratch copy should keep the contract at first"
    target = tmp_path / "fmtl" / path
    target.write_text((target.read_text() if target.exists() else "") + f"\n{line}  # deliberate\n")
    done = lint_imports(tmp_path, contract)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "BROKEN" in done.stdout and "1 broken" in done.stdout


def test_the_contract_layer_needs_only_the_standard_library():
    """spec, errors and atomic, imported in a fresh process, bring in nothing from outside the stdlib."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import fmtl.spec, fmtl.errors, fmtl.atomic\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "outside = sorted(new - set(sys.stdlib_module_names) - {'fmtl'})\n"
        "print(','.join(outside))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys, fmtl.cli; print('torch' in sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lazy.stdout.strip() == "False", "the fmtl command must not import torch before a command needs it"
