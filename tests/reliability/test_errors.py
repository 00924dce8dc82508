"""One error family: every user-facing error is an FmtlError, shown as one line, same prefix, same exit status;
bad config values are refused before anything exists on disk; a full disk is one line and loses nothing."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults import fill, one_error_line, small_disk, train_command, wait_for

from fmtl import atomic
from fmtl.errors import EXIT_USER_ERROR, FmtlError, WriteError
from fmtl.runtime.classifier import ModelError
from fmtl.runtime.images import DecodeError
from fmtl.runtime.infer import InferError
from fmtl.train import main as train_main
from fmtl.training.config import load_config
from fmtl.training.export import ExportError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from onnx_fixtures import grey_model  # noqa: E402

FMTL = str(Path(sys.executable).parent / "fmtl")


def test_every_user_facing_error_is_an_fmtl_error():
    for kind in (DecodeError, ModelError, InferError, ExportError, WriteError):
        assert issubclass(kind, FmtlError), kind


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ('epochs: "3"\n', "epochs must be int, got '3' (str)"),
        ("lr: fast\n", "lr must be float, got 'fast'"),
        ("augment: 1\n", "augment must be bool, got 1 (int)"),
        ("epochs: 2.5\n", "epochs must be int, got 2.5 (float)"),
        ("model: 3\n", "model must be str, got 3"),
        ("head: conv\n", "--head 'conv' is not one of linear, mlp"),
        ("unfreeze: last:0\n", "--unfreeze 'last:0' is not all or last:N"),
        ("unfreeze: some\n", "--unfreeze 'some' is not all or last:N"),
    ],
)
def test_bad_config_values_stop_before_anything_is_created(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    run = tmp_path / "run"
    assert train_main(["--config", str(config), "--output", str(run)]) == EXIT_USER_ERROR
    assert message in one_error_line(capsys.readouterr().err)
    assert not run.exists()


def test_good_yaml_values_are_kept_with_their_types(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("epochs: 4\nlr: 1\nmixed_precision: null\nunfreeze: last:2\n")
    cfg = load_config(["--config", str(config)])
    assert cfg.epochs == 4 and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.unfreeze == "last:2"


@pytest.mark.slow
def test_the_cli_uses_one_prefix_and_one_exit_status(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text('epochs: "3"\n')
    commands = [
        ["train", "--config", str(config)],
        ["export", str(tmp_path)],
        ["infer", str(tmp_path), "--model", str(tmp_path / "missing.onnx")],
        ["evaluate", str(tmp_path)],
    ]
    for command in commands:
        result = subprocess.run([FMTL, *command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == EXIT_USER_ERROR, (command, result.stderr)
        one_error_line(result.stderr)


# ---------------------------------------------------------------- a full disk at each write


def _check_write_error(error: WriteError, path: Path) -> None:
    text = str(error)
    assert f"cannot write {path}" in text and "free on that disk" in text and "\n" not in text


@pytest.mark.parametrize("writer", ["text", "bytes", "path"])
def test_a_full_tmpfs_leaves_the_old_file_whole(tmp_path, writer):
    with small_disk(tmp_path, "1m") as disk:
        target = disk / "results.csv"
        atomic.atomic_write_text(target, "old\n")
        fill(disk, leave=8192)
        big = "x" * 200_000
        with pytest.raises(WriteError) as caught:
            if writer == "text":
                atomic.atomic_write_text(target, big)
            elif writer == "bytes":
                atomic.atomic_write_bytes(target, big.encode())
            else:
                with atomic.atomic_path(target) as tmp:
                    tmp.write_text(big)
        _check_write_error(caught.value, target)
        assert "No space left on device" in str(caught.value)
        assert target.read_text() == "old\n"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "results.csv"]  # no temporary file left


@pytest.mark.parametrize("failing", ["mkstemp", "write", "fsync", "replace"])
def test_injected_enospc_at_each_step_of_an_atomic_write(tmp_path, monkeypatch, failing):
    """The same without a tmpfs: ENOSPC raised by each system call an atomic write makes."""
    target = tmp_path / "metrics.json"
    atomic.atomic_write_text(target, "old")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "mkstemp":
        monkeypatch.setattr(atomic.tempfile, "mkstemp", no_space)
    elif failing == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", no_space)
    elif failing == "replace":
        monkeypatch.setattr(atomic.os, "replace", no_space)
    with pytest.raises(WriteError) as caught:
        with atomic.atomic_open(target, "w") as handle:
            if failing == "write":
                no_space()
            handle.write("new")
    _check_write_error(caught.value, target)
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_torch_save_on_a_full_disk_is_one_write_error(tmp_path):
    """torch.save reports ENOSPC as RuntimeError('[enforce fail at inline_container.cc] ...')."""
    import torch

    with small_disk(tmp_path, "1m") as disk:
        fill(disk, leave=4096)
        target = disk / "optimizer.bin"
        with pytest.raises(WriteError) as caught, atomic.write_errors(target):
            torch.save({"w": torch.zeros(100_000)}, target)
        _check_write_error(caught.value, target)


@pytest.mark.slow
def test_infer_output_on_a_full_disk(tmp_path):
    model = grey_model(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(40):
        Image.new("L", (28, 28), i * 5).save(images / f"{i:03d}-with-a-long-name-to-take-room.png")
    with small_disk(tmp_path, "64k") as disk:
        out = disk / "results.jsonl"
        out.write_text("old results\n")
        fill(disk, leave=2048)
        result = subprocess.run([FMTL, "infer", str(images), "-m", str(model), "--format", "jsonl", "-o", str(out),
                                 "--quiet"], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == EXIT_USER_ERROR
        line = one_error_line(result.stderr)
        assert f"cannot write {out}" in line and "free on that disk" in line
        assert out.read_text() == "old results\n"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "results.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("save_state", [True, False])
def test_ctrl_c_says_what_can_be_resumed(tmp_path, save_state):
    """Ctrl-C promises a saved epoch only when there is one (not with --no-save-state)."""
    run = tmp_path / "run"
    args = ["--strategy", "linear", "--no-augment", "--epochs", "1000", "--output", str(run)]
    # SIGINT as a terminal's Ctrl-C delivers it (a shell's background job would inherit it ignored)
    process = subprocess.Popen(train_command(*args, *([] if save_state else ["--no-save-state"])),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        wait_for(lambda: (run / "results.csv").exists() or process.poll() is not None, 300, "epoch 1")
        process.send_signal(signal.SIGINT)
        stderr = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert ("nothing to resume from" in stderr) == (not save_state)
    assert ("--resume" in stderr) == save_state
