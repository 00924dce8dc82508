"""Exact resume: a run SIGKILLed anywhere (at an epoch boundary, inside a save, between the renames,
at random moments) and resumed ends bit-identical to the uninterrupted run; a saved state that is
damaged or hostile stops --resume with one line naming the file, and nothing is unpickled."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from faults import (
    RECIPE,
    SMALL,
    assert_same_run,
    inject_command,
    one_error_line,
    run_train,
    saved_epoch,
    train_command,
    wait_for,
)

from fmtl.errors import EXIT_USER_ERROR
from fmtl.train import main as train_main
from fmtl.training.checkpoint import sha256_file

pytestmark = pytest.mark.slow


def kill_after_epoch(run: Path, epoch: int, *extra: str) -> None:
    """Start the recipe in ``run`` and SIGKILL it as soon as ``epoch``'s training state is saved."""
    process = subprocess.Popen(train_command(*RECIPE, *extra, "--output", str(run)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: saved_epoch(run) >= epoch or process.poll() is not None, 300, f"epoch {epoch}'s state")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert saved_epoch(run) == epoch, "the run was not caught at the epoch boundary"


@pytest.fixture(scope="session")
def after_epoch_2(tmp_path_factory) -> Path:
    """A run SIGKILLed right after epoch 2's save: tests resume copies of it."""
    run = tmp_path_factory.mktemp("killed") / "run"
    kill_after_epoch(run, 2)
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_killed_at_an_epoch_boundary_resumes_bit_identical(after_epoch_2, reference, tmp_path):
    """The issue's first row: epoch 3 after --resume is epoch 3 of the uninterrupted run."""
    run = copy_of(after_epoch_2, tmp_path)
    assert not list((run / "state").glob("*.pkl"))  # fmtl's state holds no pickle of its own
    result = run_train("--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run, reference)


# One seed in CI (each costs about one run); more with FMTL_FAULT_SEEDS=1,2,3,...
SEEDS = [int(seed) for seed in os.environ.get("FMTL_FAULT_SEEDS", "1").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_anywhere_then_resume_is_the_same_run(reference, tmp_path, seed):
    """SIGKILLs inside Accelerate's save_state, between the renames, before a file's rename and at
    random moments, each followed by --resume, end in the uninterrupted run, bit for bit."""
    run = tmp_path / "run"
    kill_after_epoch(run, 1)
    rng = random.Random(seed)
    faults = ["kill@state-file#2", "kill@renames#1", f"kill@publish#{rng.randint(1, 4)}"]
    faults += [f"kill@seconds#{rng.uniform(3, 15):.1f}" for _ in range(2)]
    rng.shuffle(faults)
    killed = []
    for fault in faults:
        result = subprocess.run(inject_command(fault, args=("--resume", str(run))), capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode in (-signal.SIGKILL, 0), (fault, result.stderr[-3000:])
        killed.append(result.returncode == -signal.SIGKILL)
        print(f"{fault}: {'killed' if killed[-1] else 'finished'}, state after epoch {saved_epoch(run)}")
    assert sum(killed) >= 2  # a fault can find nothing left to strike once an earlier resume finished the run
    result = run_train("--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run, reference)
    assert not (run / "state.tmp").exists() and not (run / "state.old").exists()


def test_a_hostile_accelerate_rng_pickle_is_not_run_and_resume_refuses_it(after_epoch_2, tmp_path):
    """Accelerate's random_states_0.pkl slipped into state/ as a hostile pickle: not in the sha256
    manifest, so resume refuses it in one line before Accelerate could read it."""
    run = copy_of(after_epoch_2, tmp_path)
    marker = tmp_path / "pwned"
    (run / "state" / "random_states_0.pkl").write_bytes(pickle.dumps(Hostile(marker)))
    result = run_train("--resume", str(run))
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert "random_states_0.pkl is not in the state's sha256 manifest" in one_error_line(result.stderr)
    assert not marker.exists()


class Hostile:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rewrite_manifest(state: Path) -> None:
    """Make trainer.json's sha256 list agree with the files as they are now (a thorough attacker)."""
    info = json.loads((state / "trainer.json").read_text())
    info["files"] = {name: sha256_file(state / name) for name in info["files"] if (state / name).exists()}
    (state / "trainer.json").write_text(json.dumps(info))


def _hostile(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Hostile(marker)))


def _truncate(path: Path, marker: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


TAMPERING = {
    "hostile optimizer.bin": ("optimizer.bin", _hostile, False, "optimizer.bin is not the file that was saved"),
    "hostile optimizer.bin, sha256 forged": ("optimizer.bin", _hostile, True, "Weights only load failed"),
    "truncated model.safetensors": ("model.safetensors", _truncate, False, "model.safetensors is not the file"),
    "truncated model.safetensors, sha256 forged": ("model.safetensors", _truncate, True, "cannot resume from"),
    "truncated scheduler.bin, sha256 forged": ("scheduler.bin", _truncate, True, "cannot resume from"),
    "rng.json of another shape, sha256 forged": ("rng.json", lambda p, m: p.write_text('{"processes": [{}]}'), True,
                                                 "rng.json does not hold this run's random state"),
    "rng.json missing": ("rng.json", lambda p, m: p.unlink(), False, "rng.json is missing"),
    "trainer.json damaged": ("trainer.json", _truncate, False, "trainer.json is damaged"),
}  # fmt: skip


@pytest.mark.parametrize("case", TAMPERING)
def test_a_damaged_or_hostile_state_stops_resume_with_one_line(after_epoch_2, tmp_path, capsys, case):
    """The issue's third row and its kin: never a traceback, never a silent partial resume."""
    name, tamper, forge, message = TAMPERING[case]
    run = copy_of(after_epoch_2, tmp_path)
    marker = tmp_path / "pwned"
    tamper(run / "state" / name, marker)
    if forge:
        _rewrite_manifest(run / "state")
    before = (run / "results.csv").read_text()
    assert train_main([*SMALL, "--resume", str(run)]) == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert message in line and str(run / "state") in line, line
    assert not marker.exists()
    assert (run / "results.csv").read_text() == before  # nothing trained, nothing rewritten
