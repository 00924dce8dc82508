"""fmtl.training.plots: every figure is a readable PNG, not blank, written atomically, on real Fashion-MNIST
images; and what the figures hold (their lines, bars, images and titles, read from matplotlib's objects
just before saving) is the data they were given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from fmtl.training import plots
from fmtl.training.data import load_dataset

CLASSES = [
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
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    """The first 40 test images as uint8 [40, 1, 28, 28] and their labels."""
    test = load_dataset("fashion-mnist", "test")
    return test.images[:40].numpy(), test.labels[:40].numpy()


def fake_probs(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Peaked probabilities, right for about three images in four, wrong for the rest."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), len(CLASSES)))
    guess = np.where(rng.random(len(labels)) < 0.75, labels, rng.integers(0, len(CLASSES), len(labels)))
    logits[np.arange(len(labels)), guess] += 4
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def history(phases: list[str]) -> list[dict]:
    """A plausible training history, one row per phase entry."""
    rows = []
    for epoch, phase in enumerate(phases, 1):
        rows.append(
            {
                "epoch": epoch,
                "phase": phase,
                "train_loss": 1.2 / epoch,
                "val_loss": 1.0 / epoch + 0.1,
                "val_acc": 0.7 + 0.2 * (1 - 1 / epoch),
                "val_top5": 0.95 + 0.04 * (1 - 1 / epoch),
                "lr": 1e-3,
            }
        )
    return rows


def assert_png(path: Path, min_side: int = 200) -> None:
    """``path`` is a PNG that matplotlib reads back at a sensible size, not blank (a blank figure is one
    colour), and nothing else is beside it."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert min_side <= height <= 4000 and min_side <= width <= 4000, (height, width)
    assert pixels[..., :3].std() > 0.02, "a blank figure"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "temp files left behind"


@pytest.fixture()
def drawn(monkeypatch) -> list[Figure]:
    """The figures the plots draw, each captured just before it is saved (``_save`` clears it after)."""
    figures: list[Figure] = []
    save = plots._save

    def keep(fig: Figure, path) -> None:
        figures.append(_snapshot(fig))
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _snapshot(fig: Figure) -> dict:
    """What a figure's axes hold: per axes its title, labelled lines, bar widths and images."""
    axes = []
    for ax in fig.axes:
        lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
                 if not line.get_label().startswith("_")}  # fmt: skip
        bars = [patch.get_width() for container in ax.containers for patch in container]
        images = [np.asarray(image.get_array()) for image in ax.get_images()]
        axes.append({"title": ax.get_title(), "lines": lines, "bars": bars, "images": images})
    return {"axes": axes, "suptitle": fig._suptitle.get_text() if fig._suptitle else ""}


def test_curves_two_phases(tmp_path: Path, drawn) -> None:
    rows = history(["linear"] * 3 + ["finetune"] * 5)
    path = tmp_path / "curves.png"
    plots.plot_curves(rows, path)
    assert_png(path)
    (figure,) = drawn
    loss, accuracy = (ax for ax in figure["axes"] if ax["title"] in ("Loss", "Validation accuracy"))
    epochs = [float(row["epoch"]) for row in rows]
    assert loss["lines"]["train"] == (epochs, pytest.approx([row["train_loss"] for row in rows]))
    assert loss["lines"]["val"] == (epochs, pytest.approx([row["val_loss"] for row in rows]))
    assert accuracy["lines"]["top-1"][1] == pytest.approx([100 * row["val_acc"] for row in rows])
    assert accuracy["lines"]["top-5"][1] == pytest.approx([100 * row["val_top5"] for row in rows])
    best = [name for name in accuracy["lines"] if name.startswith("best")]
    assert best == [f"best {100 * rows[-1]['val_acc']:.1f}% (epoch 8)"]  # the last epoch is the best here


def test_curves_single_epoch_and_missing_top5(tmp_path: Path) -> None:
    rows = history(["linear"])
    rows[0]["val_top5"] = None
    path = tmp_path / "curves.png"
    plots.plot_curves(rows, path)
    assert_png(path)


def test_curves_empty_history_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plots.plot_curves([], tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []


def test_confusion_matrix(tmp_path: Path, fashion) -> None:
    _, labels = fashion
    preds = fake_probs(labels).argmax(axis=1)
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (labels, preds), 1)
    for normalize in (True, False):
        path = tmp_path / f"confusion_{normalize}.png"
        plots.plot_confusion_matrix(matrix, CLASSES, path, normalize=normalize)
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_False.png", "confusion_True.png"]


def test_confusion_matrix_many_classes_and_empty_rows(tmp_path: Path) -> None:
    matrix = np.diag(np.arange(30))  # row 0 has no images: its share must not divide by zero
    path = tmp_path / "confusion.png"
    plots.plot_confusion_matrix(matrix, [f"class {i}" for i in range(30)], path)
    assert_png(path)


def test_predictions_grey(tmp_path: Path, fashion, drawn) -> None:
    images, labels = fashion
    probs = fake_probs(labels[:20])
    path = tmp_path / "predictions.png"
    plots.plot_predictions(images[:20], labels[:20], probs, CLASSES, path)
    assert_png(path)
    (figure,) = drawn
    shown = [ax for ax in figure["axes"] if ax["images"]]  # num_images=16: the first 16, in order
    assert len(shown) == 16
    for i, ax in enumerate(shown):
        assert np.array_equal(ax["images"][0], images[i, 0])
        pred = int(probs[i].argmax())
        assert ax["title"] == f"{CLASSES[pred]} ({probs[i, pred]:.0%})\ntrue: {CLASSES[labels[i]]}"
    charts = [ax["bars"] for ax in figure["axes"] if ax["bars"]]  # num_bars=4, k=5: the top-5 of the first 4
    assert charts == [pytest.approx(sorted(probs[i], reverse=True)[:5]) for i in range(4)]
    right = int((probs[:16].argmax(axis=1) == labels[:16]).sum())
    assert figure["suptitle"] == f"Predictions: {right} of 16 right"


def test_predictions_rgb_few_classes_k_clamped(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 3, 40, 56), dtype=np.uint8)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0]])
    path = tmp_path / "predictions.png"
    plots.plot_predictions(images, np.array([0, 1, 2]), probs, ["cat", "dog", "fox"], path, k=5)
    assert_png(path)


def test_predictions_bars_only_and_grid_only(tmp_path: Path, fashion, drawn) -> None:
    images, labels = fashion
    probs = fake_probs(labels)
    for num_bars in (0, 16):
        path = tmp_path / f"bars_{num_bars}.png"
        plots.plot_predictions(images[:5], labels[:5], probs[:5], CLASSES, path, num_bars=num_bars)
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(path)[..., :3].std() > 0.02, "a blank figure"
    grid_only, bars_only = drawn
    for figure in drawn:  # all five images, in order, either way
        shown = [ax["images"][0] for ax in figure["axes"] if ax["images"]]
        assert len(shown) == 5 and all(np.array_equal(a, b[0]) for a, b in zip(shown, images[:5], strict=True))
    assert not any(ax["bars"] for ax in grid_only["axes"])  # num_bars=0: no chart
    charts = [ax["bars"] for ax in bars_only["axes"] if ax["bars"]]  # num_bars=16, clamped to the 5 images
    assert charts == [pytest.approx(sorted(probs[i], reverse=True)[:5]) for i in range(5)]


def test_augmentations_float_and_uint8(tmp_path: Path, fashion) -> None:
    images, _ = fashion
    original = np.repeat(images[0], 3, axis=0)  # RGB uint8
    normalised = (original[None] / 255.0 - 0.5) / 0.25 * np.linspace(0.5, 1.5, 6)[:, None, None, None]
    path = tmp_path / "augmentations.png"
    plots.plot_augmentations(original, normalised.astype(np.float32), path)
    assert_png(path, min_side=100)
    grey_path = tmp_path / "grey.png"
    plots.plot_augmentations(images[0], images[1:4], grey_path)
    assert grey_path.read_bytes()[:8] == PNG_SIGNATURE


def test_constant_float_image_does_not_divide_by_zero(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    plots.plot_augmentations(np.zeros((1, 8, 8)), np.ones((2, 1, 8, 8)), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_drawing_error_leaves_old_file_untouched(tmp_path: Path, fashion) -> None:
    images, labels = fashion
    path = tmp_path / "predictions.png"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="probs shape"):
        plots.plot_predictions(images[:4], labels[:4], fake_probs(labels[:3]), CLASSES, path)
    with pytest.raises(ValueError, match="does not match"):
        plots.plot_confusion_matrix(np.eye(3), CLASSES, path)
    with pytest.raises(ValueError, match="channels|C = 1 or 3"):
        plots.plot_augmentations(np.zeros((2, 8, 8)), np.zeros((1, 2, 8, 8)), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_saving_error_removes_temp_and_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")

    def half_written(self, handle, **kwargs) -> None:
        handle.write(PNG_SIGNATURE)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_curves(history(["linear"]), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_no_torch_and_no_pyplot_figures_on_import() -> None:
    code = (
        "import sys, numpy as np, fmtl.training.plots as p, tempfile, os\n"
        "d = tempfile.mkdtemp(); p.plot_augmentations(np.zeros((1, 4, 4)), np.zeros((1, 1, 4, 4)), os.path.join(d, 'a.png'))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_accepts_torch_tensors(tmp_path: Path, fashion) -> None:
    torch = pytest.importorskip("torch")
    images, labels = fashion
    probs = torch.tensor(fake_probs(labels[:4]), requires_grad=True)  # a live graph must not block plotting
    path = tmp_path / "predictions.png"
    plots.plot_predictions(torch.tensor(images[:4]), torch.tensor(labels[:4]), probs, CLASSES, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_reliability_before_and_after(tmp_path: Path, fashion) -> None:
    _, labels = fashion
    probs = fake_probs(labels)
    sharper = probs**3 / (probs**3).sum(axis=1, keepdims=True)
    path = tmp_path / "calibration.png"
    plots.plot_reliability(labels, {"before (temperature 1)": probs, "after (temperature 0.333)": sharper}, path)
    assert_png(path)
    assert matplotlib.image.imread(path).shape[1] > matplotlib.image.imread(path).shape[0]  # two columns side by side


def test_reliability_refuses_mismatched_probabilities(tmp_path: Path, fashion) -> None:
    _, labels = fashion
    path = tmp_path / "calibration.png"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="do not match"):
        plots.plot_reliability(labels, {"before": fake_probs(labels[:5])}, path)
    with pytest.raises(ValueError, match="no probabilities"):
        plots.plot_reliability(labels, {}, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]
