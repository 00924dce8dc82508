"""Data sources on real Fashion-MNIST: IDX, CSV and image folders."""

from __future__ import annotations

import gzip
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fmtl.errors import DataError, MissingSplitError
from fmtl.training.data import FASHION_MNIST_CLASSES, load_csv, load_dataset, read_idx, seeded_subset, stratified_split


def test_fashion_mnist_sizes_and_classes():
    train = load_dataset("fashion-mnist", "train", val_fraction=0)
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[-1] == "Ankle boot"


def test_validation_split_is_stratified_seeded_and_complete():
    train = load_dataset("fashion-mnist", "train", val_fraction=0.1, seed=3)
    val = load_dataset("fashion-mnist", "val", val_fraction=0.1, seed=3)
    assert len(train) == 54000 and len(val) == 6000
    assert val.labels.bincount().tolist() == [600] * 10
    again = load_dataset("fashion-mnist", "val", val_fraction=0.1, seed=3)
    assert torch.equal(val.images, again.images)
    other = load_dataset("fashion-mnist", "val", val_fraction=0.1, seed=4)
    assert not torch.equal(val.images, other.images)
    train_idx, val_idx = stratified_split(load_dataset("fashion-mnist", "train", val_fraction=0).labels, 0.1, 3)
    assert len(set(train_idx.tolist()) | set(val_idx.tolist())) == 60000
    assert not set(train_idx.tolist()) & set(val_idx.tolist())


def test_seeded_subset_has_exactly_the_size_asked_for():
    train = load_dataset("fashion-mnist", "train")  # 54,000 images after the val split
    for count in (512, 1919, 7):
        sub = seeded_subset(train, count, seed=0)
        assert len(sub) == count
        assert sub.labels.bincount(minlength=10).max() - sub.labels.bincount(minlength=10).min() <= 1


def test_seeded_subset_is_stratified():
    sub = seeded_subset(load_dataset("fashion-mnist", "test"), 500, seed=0)
    assert len(sub) == 500 and sub.labels.bincount().tolist() == [50] * 10


def test_idx_reader_checks_magic_and_size(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(DataError, match="header promises"):
        read_idx(bad, 0x803)
    with pytest.raises(DataError, match="magic"):
        read_idx(bad, 0x801)


def test_missing_fashion_mnist_names_three_ways(tmp_path, monkeypatch):
    import fmtl.training.data.sources as data

    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", tmp_path / "none")
    monkeypatch.delenv("FMTL_DATA_DIR", raising=False)
    data.load_fashion_mnist.cache_clear()
    try:
        with pytest.raises(DataError) as error:
            data.load_fashion_mnist("test", None, False)
    finally:
        data.load_fashion_mnist.cache_clear()
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and "FMTL_DATA_DIR" in message and "network" in message
    assert "\n" not in message


def _write_csv(path, images, labels, header=True):
    rows = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    head = "label," + ",".join(f"pixel{i}" for i in range(1, 785)) if header else ""
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=head, comments="")
    if not header:  # savetxt writes an empty first line for header=""
        path.write_text(path.read_text().lstrip("\n"))


@pytest.mark.parametrize("header", [True, False])
def test_csv_gives_exactly_the_idx_images(tmp_path, header):
    test = load_dataset("fashion-mnist", "test")
    images, labels = test.images[:1500].numpy(), test.labels[:1500].numpy()
    path = tmp_path / "fashion-mnist_test.csv"
    _write_csv(path, images, labels, header)
    loaded = load_csv(path)
    assert torch.equal(loaded.images, test.images[:1500]) and torch.equal(loaded.labels, test.labels[:1500])
    assert loaded.classes == FASHION_MNIST_CLASSES


def test_csv_errors_name_the_line(tmp_path):
    test = load_dataset("fashion-mnist", "test")
    path = tmp_path / "a.csv"
    _write_csv(path, test.images[:5].numpy(), test.labels[:5].numpy())
    lines = path.read_text().splitlines()
    short = lines[:3] + [lines[3].rsplit(",", 1)[0]] + lines[4:]
    path.write_text("\n".join(short) + "\n")
    with pytest.raises(DataError, match="line 4 has 784 columns"):
        load_csv(path)
    big = lines[:2] + [lines[2].replace(",0,", ",256,", 1)] + lines[3:]
    path.write_text("\n".join(big) + "\n")
    with pytest.raises(DataError, match="line 3 has a pixel value outside 0..255"):
        load_csv(path)


def test_csv_has_no_test_split_unless_given(tmp_path):
    test = load_dataset("fashion-mnist", "test")
    train_csv, test_csv = tmp_path / "train.csv", tmp_path / "test.csv"
    _write_csv(train_csv, test.images[:300].numpy(), test.labels[:300].numpy())
    _write_csv(test_csv, test.images[300:400].numpy(), test.labels[300:400].numpy())
    with pytest.raises(MissingSplitError):
        load_dataset(str(train_csv), "test")
    assert len(load_dataset(str(train_csv), "test", test_source=str(test_csv))) == 100
    assert len(load_dataset(str(train_csv), "train")) + len(load_dataset(str(train_csv), "val")) == 300


def _odd_folder(root):
    """Two classes of real Fashion-MNIST pixels saved in many PIL modes, plus a broken file."""
    test = load_dataset("fashion-mnist", "test")
    shirts = test.images[test.labels == 0][:4, 0].numpy()
    boots = test.images[test.labels == 9][:4, 0].numpy()
    for name, arrays in (("shirt", shirts), ("boot", boots)):
        folder = root / name
        folder.mkdir(parents=True)
        grey = Image.fromarray(arrays[0])
        grey.save(folder / "grey.png")
        grey.convert("RGB").save(folder / "rgb.JPG", quality=95)
        grey.convert("RGBA").save(folder / "rgba.png")
        grey.convert("P").save(folder / "palette.gif")
        grey.convert("CMYK").save(folder / "cmyk.tiff")
        rotated = Image.fromarray(arrays[1]).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        rotated.convert("RGB").save(folder / "exif.jpg", exif=exif, quality=95)
    (root / "boot" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "boot" / "notes.txt").write_text("not an image, not listed")
    # What macOS and editors leave behind: never images to train on (inference skips them too).
    (root / "boot" / "._grey.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble fork")
    (root / "shirt" / ".thumbs").mkdir()
    grey.save(root / "shirt" / ".thumbs" / "grey.png")


def test_image_folder_with_odd_files(tmp_path):
    _odd_folder(tmp_path / "clothes")
    with pytest.warns(UserWarning, match="broken.png"):
        data = load_dataset(str(tmp_path / "clothes"), "train", val_fraction=0)
    assert data.classes == ["boot", "shirt"]
    assert len(data) == 12  # 6 readable per class, the broken one skipped, hidden files and folders unseen
    from fmtl.runtime.images import collect_image_paths

    inferred, _ = collect_image_paths([str(tmp_path / "clothes")], recursive=True)
    assert len(inferred) == 13  # inference walks the same files (the broken one included, reported later)
    assert data.channels == 3 and data.size == (28, 28)  # RGB files present -> RGB
    assert data.labels.bincount().tolist() == [6, 6]
    # Files load in sorted order; boot's second readable file is exif.jpg, stored rotated with an
    # orientation tag: EXIF applied, it comes back upright, equal to the original pixels (JPEG-close).
    test = load_dataset("fashion-mnist", "test")
    upright = test.images[test.labels == 9][1, 0].float()
    exif_image = data.images[1].float().mean(0)
    assert (exif_image - upright).abs().mean() < 4
    assert (exif_image - upright.T).abs().mean() > 20  # would fail if the tag were ignored


def test_image_folder_cache_skips_decoding(tmp_path, monkeypatch):
    _odd_folder(tmp_path / "clothes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = load_dataset(str(tmp_path / "clothes"), "train", val_fraction=0)
        import fmtl.training.data.store as store

        monkeypatch.setattr(store, "_build", lambda *a: pytest.fail("decoded again"))
        second = load_dataset(str(tmp_path / "clothes"), "train", val_fraction=0)
    assert torch.equal(first.images, second.images)


def test_image_folder_mixed_sizes_and_splits(tmp_path):
    for split in ("train", "test"):
        for cls, shade in (("dark", 30), ("light", 220)):
            folder = tmp_path / "d" / split / cls
            folder.mkdir(parents=True)
            for i, size in enumerate([(40, 30), (50, 60), (20, 20)]):
                Image.new("L", size, shade + i).save(folder / f"{i}.png")
    train = load_dataset(str(tmp_path / "d"), "train", val_fraction=0, source_size=32)
    assert train.size == (32, 32) and train.channels == 1 and len(train) == 6
    assert len(load_dataset(str(tmp_path / "d"), "test", source_size=32)) == 6
    with pytest.raises(MissingSplitError):
        load_dataset(str(tmp_path / "d" / "train"), "test")


def test_empty_class_folder_is_an_error(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "d" / "a" / "x.png")
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(str(tmp_path / "d"), "train")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(str(tmp_path / "d" / "a"), "train")


def test_unknown_source_and_split():
    with pytest.raises(DataError, match="not found"):
        load_dataset(os.path.join("no", "such", "thing"), "train")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("fashion-mnist", "dev")


def test_max_val_samples_shrinks_validation_only():
    from fmtl.spec import DataOptions
    from fmtl.training.data import load_run_split

    test_only = DataOptions(max_eval_samples=500)  # what --max-test-samples 500 records
    val_only = DataOptions(max_eval_samples=500, max_val_samples=200)
    assert len(load_run_split(test_only, "val")) == 6_000 and len(load_run_split(val_only, "val")) == 200
    assert len(load_run_split(val_only, "test")) == 500  # the test set is what --max-test-samples says
    assert len(load_run_split(DataOptions(max_val_samples=300), "test")) == 10_000
    assert len(load_run_split(val_only, "train")) == 54_000
    counts = torch.bincount(load_run_split(val_only, "val").labels, minlength=10)
    assert counts.tolist() == [20] * 10  # a stratified subset of the run's val split
