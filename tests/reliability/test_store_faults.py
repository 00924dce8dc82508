"""The data path's faults, for real: a store build SIGKILLed or out of disk leaves nothing read as a store; a
photo-folder run with DataLoader workers SIGKILLed mid-epoch resumes bit-for-bit without replaying the
epoch; two processes on one store count each val and test image once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faults import ROOT, TRAIN_PY, assert_same_run, one_error_line, small_disk, wait_for
from PIL import Image

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# a photo folder run: fine-tuning with augmentation from the store, workers gathering its batches
PHOTO_RUN = ["--image-size", "32", "--source-size", "48", "--batch-size", "16", "--eval-batch-size", "32",
             "--strategy", "hybrid", "--head-epochs", "1", "--epochs", "2", "--val-fraction", "0.2", "--quiet"]  # fmt: skip


def photos(root: Path, per_class: int, size=(64, 48)) -> Path:
    rng = np.random.default_rng(1)
    for label in range(4):
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8) + 40 * label
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def env_with_cache(cache: Path) -> dict:
    return {**os.environ, "FMTL_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}


def build(folder: Path, env: dict) -> subprocess.Popen:
    code = f"from pathlib import Path; from fmtl.training.data import load_folder; print(len(load_folder(Path({str(folder)!r}), None, quiet=True)))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_a_store_build_killed_midway_is_never_read_and_the_next_run_builds_it(tmp_path):
    folder = photos(tmp_path / "photos", 400, size=(320, 240))
    cache = tmp_path / "cache"
    process = build(folder, env_with_cache(cache))
    data_files = lambda: list((cache / "stores").glob("*.tmp-*/images.u8")) if (cache / "stores").exists() else []  # noqa: E731
    wait_for(lambda: any(f.stat().st_size > 0 for f in data_files()) or process.poll() is not None, 120, "the build")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not [p for p in (cache / "stores").iterdir() if ".tmp-" not in p.name], "a killed build left a store"
    again = build(folder, env_with_cache(cache))
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert out.strip() == "1600" and not list((cache / "stores").glob("*.tmp-*"))


def test_a_full_disk_while_building_is_one_line_and_leaves_no_partial_store(tmp_path):
    folder = photos(tmp_path / "photos", 100, size=(320, 240))  # 400 x 224 x 224 x 3: 60 MB of store
    with small_disk(tmp_path, "8m") as disk:
        result = subprocess.run([sys.executable, TRAIN_PY, "--data", str(folder), "--output", str(tmp_path / "run"),
                                 "--quiet"], env=env_with_cache(disk / "cache"), capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        line = one_error_line(result.stderr)
        assert "No space left" in line or "disk" in line.lower(), line
        assert not [p for p in (disk / "cache" / "stores").iterdir()], "a partial store was left"


def photo_run(folder: Path, run: Path, cache: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, TRAIN_PY, "--data", str(folder), *PHOTO_RUN, "--output", str(run), *extra]
    return subprocess.Popen(command, env=env_with_cache(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def saved_position(run: Path) -> dict | None:
    try:
        return json.loads((run / "state" / "trainer.json").read_text()).get("position")
    except (OSError, ValueError):
        return None


def test_a_photo_run_with_workers_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    folder, cache = photos(tmp_path / "photos", 60), tmp_path / "cache"
    workers = ("--workers", "2", "--save-every-steps", "3")
    reference = tmp_path / "reference"
    done = photo_run(folder, reference, cache, *workers)
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]
    run = tmp_path / "run"
    process = photo_run(folder, run, cache, *workers)
    try:  # caught inside the fine-tuning epoch, after a mid-epoch save
        wait_for(lambda: (saved_position(run) or {}).get("epoch") == 2 or process.poll() is not None, 600, "a save")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    position = saved_position(run)
    assert position and position["epoch"] == 2 and position["step"] >= 3, position
    resumed = subprocess.run([sys.executable, TRAIN_PY, "--resume", str(run), "--quiet"], env=env_with_cache(cache),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {position['step']} of epoch 2" in resumed.stdout + resumed.stderr
    assert_same_run(run, reference)


def test_two_processes_on_one_store_count_each_val_and_test_image_once(tmp_path):
    root = tmp_path / "photos"
    photos(root / "train", 30)
    photos(root / "test", 9)  # 36 test images: an odd share per rank at batch 16
    run = tmp_path / "run"
    command = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/cpu-multiprocess.yaml"),
               "--main_process_port", "29633", TRAIN_PY, "--data", str(root), "--image-size", "32",
               "--strategy", "linear", "--epochs", "1", "--eval-batch-size", "16", "--val-fraction", "0.3",
               "--quiet", "--output", str(run)]  # fmt: skip
    result = subprocess.run(command, env=env_with_cache(tmp_path / "cache"), capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 36
    assert not list(run.glob(".features-*"))  # the head's features were one mapped file, gone once mapped
    with open(run / "results.csv") as handle:
        assert int(handle.read().splitlines()[-1].split(",")[6]) == 36  # val_images: 30 % of 120


def test_a_disk_too_small_for_the_head_features_is_one_error_and_leaves_no_file(tmp_path):
    """The features file's blocks are allocated before any is written: a full disk is a WriteError naming it,
    never a SIGBUS while writing a mapped page, and no partial file stays."""
    import torch
    from accelerate import Accelerator

    from fmtl.errors import WriteError
    from fmtl.training import caches
    from fmtl.training.prepare import index_loader

    class Pixels:  # a stand-in backbone whose features are the pixels: 3,072 floats an image
        def eval(self):
            return self

        def features(self, x):
            return x.flatten(1).float()

    class Images:
        data = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)  # 786 KB of features

    accelerator = Accelerator(cpu=True)
    sets = {"train": (Images(), accelerator.prepare(index_loader(64, 16)))}
    with small_disk(tmp_path, "256k") as disk:
        with pytest.raises(WriteError, match="No space left on device.*free some space"):
            caches.extract_features(Pixels(), accelerator, lambda images, idx, _: images.data[idx], sets, True, disk)
        assert list(disk.iterdir()) == []
