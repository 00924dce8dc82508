"""Divergence is an error, not a result; a full disk during any save is one line and loses nothing."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from faults import SMALL, fill, one_error_line, run_train, saved_epoch, small_disk, train_command, wait_for
from safetensors.torch import load_file

from fmtl import atomic
from fmtl.errors import EXIT_USER_ERROR
from fmtl.train import main as train_main
from fmtl.training.checkpoint import sha256_file, verify_files

pytestmark = pytest.mark.slow


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_a_nan_loss_stops_the_run_and_saves_no_nan_model(tmp_path, capsys):
    """The issue's fourth row: --lr 1e6 --grad-clip 0 used to end in exit 0 and a NaN model.safetensors."""
    run = tmp_path / "run"
    code = train_main([*SMALL, "--strategy", "finetune", "--lr", "1e6", "--grad-clip", "0", "--epochs", "3",
                       "--output", str(run)])  # fmt: skip
    assert code == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "loss became NaN at epoch" in line and "step" in line and "lower --lr (now 1e+06" in line, line
    assert "--grad-clip" in line and not (run / "metrics.json").exists()
    for saved in (run / "model.safetensors", run / "state" / "model.safetensors"):
        assert not saved.exists() or all_finite(saved)


def test_divergence_after_a_good_epoch_keeps_the_good_model_and_state(tmp_path, capsys):
    """The backbone's learning rate explodes once it unfreezes (epoch 2): epoch 1's model and state stay."""
    run = tmp_path / "run"
    code = train_main([*SMALL, "--strategy", "hybrid", "--head-epochs", "1", "--epochs", "3", "--grad-clip", "0",
                       "--backbone-lr-scale", "1e12", "--output", str(run)])  # fmt: skip
    assert code == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "at epoch 2 step" in line, line
    info = json.loads((run / "model.json").read_text())
    assert info["best_epoch"] == 1 and info["weights_sha256"] == sha256_file(run / "model.safetensors")
    assert all_finite(run / "model.safetensors") and all_finite(run / "state" / "model.safetensors")
    assert saved_epoch(run) == 1


def test_a_full_disk_while_the_state_is_saved(tmp_path):
    """The issue's fifth row, on a real full disk: one line naming the path and the free space, the
    previous model and state intact, and --resume finishes the run once there is room again."""
    with small_disk(tmp_path, "160m") as disk:
        run = disk / "run"
        recipe = ("--strategy", "hybrid", "--head-epochs", "1", "--epochs", "2", "--output", str(run))
        process = subprocess.Popen(train_command(*recipe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)  # fmt: skip
        try:
            wait_for(lambda: saved_epoch(run) >= 1 or process.poll() is not None, 300, "epoch 1's state")
            # room for a new model.safetensors, not for the state (model + optimizer moments) after it
            filler = fill(disk, leave=(run / "model.safetensors").stat().st_size + (1 << 20))
            stderr = process.communicate(timeout=300)[1]
        finally:
            process.kill()
        assert process.returncode == EXIT_USER_ERROR, stderr[-3000:]
        line = one_error_line(stderr)
        assert f"cannot write {run}" in line and "free on that disk" in line, line
        assert saved_epoch(run) == 1 and not (run / "state.tmp").exists()
        state = json.loads((run / "state" / "trainer.json").read_text())
        verify_files(run / "state", state["files"])  # the previous state, whole
        info = json.loads((run / "model.json").read_text())
        assert info["weights_sha256"] == sha256_file(run / "model.safetensors")
        filler.unlink()
        result = run_train("--resume", str(run))
        assert result.returncode == 0, result.stderr[-3000:]
        assert saved_epoch(run) == 2 and (run / "metrics.json").is_file()


# A file of each kind a run writes, and when to fail it: (in the temporary file's name, which write of it).
# model.json, rng.json and metrics.json go through the same writer as results.csv and trainer.json.
WRITES = {
    "results.csv": (".results.csv.", 2),
    "model.safetensors": (".tmp.safetensors", 1),
    "trainer.json": (".trainer.json.", 2),
    "curves.png": (".curves.png.", 1),
}


@pytest.mark.parametrize("target", WRITES)
def test_injected_enospc_at_each_write_of_a_run(tmp_path, monkeypatch, capsys, target):
    """Where no tmpfs can be mounted: ENOSPC injected when each file's write begins."""
    marker, nth = WRITES[target]
    run, calls = tmp_path / "run", []
    original = atomic.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if marker in kwargs.get("prefix", "") + kwargs.get("suffix", ""):
            calls.append(1)
            if len(calls) == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    code = train_main([*SMALL, "--strategy", "linear", "--no-augment", "--epochs", "2", "--output", str(run)])
    monkeypatch.undo()
    assert code == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {run}" in line and "No space left on device" in line and "free on that disk" in line
    if saved_epoch(run):  # whatever was saved before is whole and resumable
        verify_files(run / "state", json.loads((run / "state" / "trainer.json").read_text())["files"])
    leftovers = [p.name for p in run.rglob(".*.tmp*")] + [p.name for p in run.glob("state.*")]
    assert not leftovers, leftovers


def test_injected_torch_write_failure_in_accelerate_save_state(tmp_path, monkeypatch, capsys):
    """What the issue saw (torch.save's '[enforce fail at inline_container.cc] unexpected pos') as one line."""
    import accelerate.checkpointing

    run, original = tmp_path / "run", accelerate.checkpointing.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin") and saved_epoch(run) >= 1:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4372")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    code = train_main([*SMALL, "--strategy", "linear", "--no-augment", "--epochs", "2", "--output", str(run)])
    monkeypatch.undo()
    assert code == EXIT_USER_ERROR
    assert f"cannot write {run / 'state.tmp'}" in one_error_line(capsys.readouterr().err)
    assert saved_epoch(run) == 1 and not (run / "state.tmp").exists()
    shutil.rmtree(run)
