"""The documentation tells the truth: its commands run, its options exist, its links resolve, its figures
are copies of what the benchmarks wrote.

Every shell command in README.md's code blocks is either run here as written (in a scratch folder, with
this venv's ``fmtl``) or listed in ``ELSEWHERE`` with the file that exercises it, and every ``--option``
README or docs/ names must show in the ``--help`` of the command it belongs to.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
MARKDOWN = [
    README,
    *sorted((REPO / "docs").glob("*.md")),
    *(REPO / folder / "README.md" for folder in ("benchmarks", "benchmarks/peers", "launch", "export")),
    *sorted((REPO / "benchmarks" / "results").glob("*.md")),
]

# README commands too slow or too stateful to run here, each with the file that runs it and a string that
# file must contain (so the pointer cannot go stale silently).
ELSEWHERE = {
    "pip install .": ("Makefile", "pip install --quiet . "),  # test-runtime: the torch-free install
    'pip install ".[train]"': ("pyproject.toml", 'dev = ["fmtl[train,'),  # make setup installs .[dev]
    'pip install ".[dev]"': ("Makefile", '-e ".[dev]"'),
    "make test": (".ci/run", "make test"),
    "make demo": ("Makefile", "demo: setup data"),  # run by hand: 15 minutes of training
    "fmtl train --budget 10m --output runs/fashion": ("tests/test_recipe.py", '"--budget"'),
    "fmtl export --onnx runs/fashion": ("tests/test_pipeline.py", '"export", "--onnx"'),
    "fmtl serve export/fashion.onnx --port 8000": ("tests/runtime/test_serve.py", '"serve"'),
    "curl --data-binary @photo.png -H 'Content-Type: image/png' localhost:8000/v1/classify": (
        "tests/runtime/test_serve.py",
        "/v1/classify",
    ),
    "fmtl train --data photos/ --budget 30m --output runs/photos": ("tests/test_train.py", '"--data"'),
    "fmtl train --model resnet18 --strategy linear --image-size 112 --epochs 5": (
        "tests/test_train.py",
        '"--strategy", "linear"',
    ),
    "fmtl train --resume runs/photos --epochs 8": ("tests/test_train.py", '"--resume"'),
    "accelerate launch --config_file launch/cpu-multiprocess.yaml fmtl/train.py --budget 10m": (
        "tests/test_train.py",
        "cpu-multiprocess",
    ),
    "accelerate launch --config_file launch/multi-gpu.yaml --num_processes 8 fmtl/train.py --image-size 224": (
        "benchmarks/gpu_check.sh",  # the GPU check launches the same way; no GPU in CI
        "accelerate launch",
    ),
    "fmtl infer /mnt/shared/photos -r --engine ray --address auto --out results/": (
        "tests/runtime/test_ray.py",
        '"--engine", "ray"',
    ),
    "fmtl serve export/fashion.onnx --engine ray --replicas 2": (
        "tests/runtime/test_serve_ray.py",
        '"--engine", "ray", "--replicas", "2"',
    ),
}
# README commands run here, in README order, in one scratch folder (export/fashion.onnx is a small real
# fmtl-format model, as `fmtl export` would have left it).
RUN = ["fmtl samples samples/ -n 12", "fmtl infer samples/ --model export/fashion.onnx -k 3"]
# Options of commands other than fmtl's that the prose names, and the command whose --help shows each.
OTHER_OPTIONS = {
    "--report": [sys.executable, "benchmarks/depthwise.py", "--help"],
    "--strict": [str(BIN / "mkdocs"), "build", "--help"],
}
# The docs/ pages this test checks option by option (the others have their own owners' tests).
OWN_PAGES = ("index.md", "training.md", "distributed.md", "guarantees.md", "architecture.md")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def code_blocks(path: Path, shell_only: bool = True) -> list[str]:
    """The fenced code blocks of a markdown file (shell ones: no language, bash, sh, shell or console)."""
    blocks = re.findall(r"^```([a-z]*)\n(.*?)^```", path.read_text(), flags=re.M | re.S)
    return [body for lang, body in blocks if not shell_only or lang in ("", "bash", "sh", "shell", "console")]


def commands(path: Path) -> list[str]:
    """Each shell command of ``path``'s code blocks, continuation lines joined, comments dropped, normalised."""
    found = []
    for block in code_blocks(path):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append(shlex.join(words))
    return found


def normalised(command: str) -> str:
    return shlex.join(shlex.split(command, comments=True))


@functools.cache
def help_text(*command: str) -> str:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-2000:]}"
    return done.stdout


def fmtl_help(sub: str) -> str:
    return help_text(str(BIN / "fmtl"), sub, "--help")


def shows(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def options_of(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if re.fullmatch(r"--?[a-zA-Z][\w-]*(=.*)?", w)]


def unknown_options(command: str) -> list[str]:
    """The options ``command`` uses that the --help of what they belong to does not show."""
    words = shlex.split(command)
    if words[0] == "fmtl" and len(words) > 1 and not words[1].startswith("-"):
        return [o for o in options_of(words[2:]) if not shows(o, fmtl_help(words[1]))]
    if words[0] == ".venv/bin/python" and words[1].startswith("benchmarks/"):
        return [o for o in options_of(words[2:]) if not shows(o, help_text(sys.executable, words[1], "--help"))]
    if words[:2] == ["accelerate", "launch"]:
        script = words.index("fmtl/train.py")
        launcher = help_text(str(BIN / "accelerate"), "launch", "--help")
        return [o for o in options_of(words[2:script]) if not shows(o, launcher)] + [
            o for o in options_of(words[script + 1 :]) if not shows(o, fmtl_help("train"))
        ]
    return []


def test_readme_is_a_front_door_of_at_most_12_kb():
    assert README.stat().st_size <= 12 * 1024, f"README.md is {README.stat().st_size:,} bytes"


def test_every_readme_command_is_run_here_or_exercised_elsewhere():
    found = commands(README)
    listed = {normalised(c) for c in [*ELSEWHERE, *RUN]}
    assert [c for c in found if c not in listed] == [], "README commands neither run here nor listed in ELSEWHERE"
    assert sorted(listed - set(found)) == [], "commands listed here that README no longer has"
    for command, (where, marker) in ELSEWHERE.items():
        assert marker in (REPO / where).read_text(), f"{where} no longer exercises `{command}` ({marker!r})"


def test_readme_commands_use_only_options_their_help_shows():
    problems = {c: unknown_options(c) for c in commands(README)}
    assert {c: o for c, o in problems.items() if o} == {}


@pytest.mark.parametrize("page", sorted((REPO / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_commands_use_only_options_their_help_shows(page):
    problems = {c: unknown_options(c) for c in commands(page) if c.startswith(("fmtl ", "accelerate launch"))}
    assert {c: o for c, o in problems.items() if o} == {}


def inline_code(path: Path) -> list[str]:
    """The inline code spans of a markdown file's prose."""
    prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


@functools.cache
def known_options() -> str:
    """Every --help text an option in the docs may come from: each fmtl command's and the launcher's."""
    overview = help_text(str(BIN / "fmtl"), "--help")
    subcommands = re.findall(r"^  (\w+)  ", overview.split("Commands:")[1], flags=re.M)
    launcher = help_text(str(BIN / "accelerate"), "launch", "--help")
    return "\n".join([overview, launcher, *(fmtl_help(sub) for sub in subcommands)])


@pytest.mark.parametrize("page", [README, *(REPO / "docs" / f for f in OWN_PAGES)], ids=lambda p: p.name)
def test_every_option_the_docs_name_exists(page):
    """Inline code too: a command in a span is checked like a code block's; a bare `--option` must show in
    some fmtl command's --help (or the launcher's), or in the --help of the command OTHER_OPTIONS names."""
    spans = inline_code(page)
    full = [
        s for s in spans if s.startswith(("fmtl ", "accelerate launch ", ".venv/bin/python benchmarks/", "sbatch "))
    ]
    assert {c: unknown_options(c) for c in full if unknown_options(c)} == {}  # sbatch's options are Slurm's
    named = {o for s in spans if s not in full for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", s)}
    assert [o for o in sorted(named) if not shows(o, known_options()) and o not in OTHER_OPTIONS] == []
    for option in named & set(OTHER_OPTIONS):
        command = OTHER_OPTIONS[option]
        assert shows(option, help_text(*command)), f"`{' '.join(command)}` does not show {option}"


def test_readme_installs_name_real_extras():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set(re.findall(r'"\.\[(\w+)\]"', README.read_text()))
    assert named and named <= set(extras), f"README names extras pyproject.toml lacks: {named - set(extras)}"
    makefile = (REPO / "Makefile").read_text()
    targets = {w.split()[1] for w in commands(README) if w.startswith("make ")}
    assert all(re.search(rf"^{t}:", makefile, flags=re.M) for t in targets)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    """`fmtl samples` on the real dataset, then `fmtl infer` on what it wrote, exactly as README types them."""
    sys.path.insert(0, str(REPO / "tests" / "runtime"))
    from onnx_fixtures import save_model

    save_model(tmp_path / "export" / "fashion.onnx", classes=FASHION_CLASSES)
    outputs = {}
    for command in RUN:
        words = shlex.split(command)
        done = subprocess.run(
            [str(BIN / words[0]), *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"`{command}` failed:\n{done.stderr[-2000:]}"
        outputs[command] = done.stdout
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert len(pngs) == 12
    table = outputs[RUN[1]]
    assert all(png.name in table for png in pngs), table  # one row per image, top-3 of the model's classes
    assert sum(name in table for name in FASHION_CLASSES) >= 3


def links(path: Path) -> list[str]:
    """Relative link targets of a markdown file (inline links and images), code blocks and spans left out."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", [p for p in MARKDOWN if p.exists()], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = [t for t in links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert broken == [], f"{page.relative_to(REPO)} links to missing files"


def test_results_tables_are_copies_of_what_the_benchmarks_wrote():
    """A table under `<!-- results: FILE -->` is made of FILE's lines, and the text after it gives FILE's date."""
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for source, table, after in re.findall(
            r"<!-- results: (\S+) -->\n((?:\|[^\n]*\n)+)\n(.*?)(?:\n\n|\Z)", page.read_text(), flags=re.S
        ):
            written = (REPO / source).read_text()
            assert [line for line in table.splitlines() if line not in written.splitlines()] == [], source
            date = re.search(r"^- date: (\S+)", written, flags=re.M).group(1)
            assert date in after, f"{page.name}: the text after {source}'s table should give its date {date}"
            assert "- machine: " in written and "- command: `" in written, f"{source} lacks its provenance"
            checked += 1
    assert checked >= 3


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    """`make docs`'s command. Not --quiet: it hides the warnings --strict turns into a failure."""
    command = [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)


def test_the_docs_site_builds_strictly(tmp_path):
    """mkdocs --strict: every link and anchor between the pages of docs/ resolves."""
    done = mkdocs_build(REPO, tmp_path / "site")
    assert done.returncode == 0, done.stderr


def test_a_broken_link_fails_the_docs_build(tmp_path):
    """The link check can fail: the same configuration on a page with a broken link and a broken anchor."""
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[gone](missing.md), [here](#no-such-heading)\n")
    done = mkdocs_build(tmp_path, tmp_path / "site")
    assert done.returncode != 0
    assert "missing.md" in done.stderr and "no-such-heading" in done.stderr
