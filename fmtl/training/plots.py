"""Figures a person would rather look at than read, each saved as a PNG atomically.

- ``plot_curves``: loss and validation accuracy per epoch, training phases marked.
- ``plot_confusion_matrix``: true x predicted, coloured by row share, counts in the cells.
- ``plot_predictions``: images titled with prediction and truth, top-k bars for the first few.
- ``plot_augmentations``: an image beside its augmented versions.
- ``plot_reliability``: accuracy against confidence (reliability diagram), before and after calibration.

Built on matplotlib's object-oriented ``Figure`` API (no pyplot): no display needed, no
global figure registry, nothing left open. A figure is written through ``fmtl.atomic``,
so the target is either its old self or the complete new PNG; an error while drawing
leaves it untouched. Inputs are numpy arrays; torch tensors are accepted too (detached
and moved to the CPU by duck typing), but torch is never imported here.

Image display rule (all functions): uint8 images are shown as they are (0..255); any
other dtype is min-max rescaled *per image* to 0..1, so normalised tensors are viewable,
at the cost of hiding brightness and contrast differences between images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from fmtl.atomic import atomic_open
from fmtl.training.metrics import CALIBRATION_BINS, expected_calibration_error, reliability_bins

DPI = 100  # pixels per inch of every saved PNG
GRID_COLUMNS = 8  # images per row in image grids
CELL_INCHES = 1.5  # width of one image cell in a grid
RIGHT, WRONG, NEUTRAL = "tab:green", "tab:red", "0.7"  # prediction colours
ANNOTATE_MAX_CLASSES = 20  # confusion-matrix cells carry numbers up to this many classes
TICK_LABEL_MAX_CLASSES = 100  # above this, class names on the confusion axes are unreadable


# ---------------------------------------------------------------- shared helpers


def _as_array(x: Any) -> np.ndarray:
    """A numpy array from an array-like or a torch tensor (any device), without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` to ``path`` as PNG through a temp file beside it (fsynced, then os.replace)."""
    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=DPI)
    finally:
        fig.clear()


def _rescale(image: np.ndarray) -> np.ndarray:
    """Min-max rescale to 0..1 (a constant image becomes all zeros; NaN becomes 0)."""
    image = image.astype(np.float64)
    finite = image[np.isfinite(image)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)


def _show(ax: Axes, image: Any) -> None:
    """Draw one [C, H, W] (C = 1 or 3) or [H, W] image with no ticks or frame; see the module doc."""
    img = _as_array(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    elif img.ndim != 2:
        raise ValueError(f"expected an image [C, H, W] with C = 1 or 3, got shape {img.shape}")
    img = img if img.dtype == np.uint8 else _rescale(img)
    grey = {"cmap": "gray", "vmin": 0, "vmax": 255 if img.dtype == np.uint8 else 1} if img.ndim == 2 else {}
    ax.imshow(img, **grey)
    ax.set_xticks([])
    ax.set_yticks([])
    _frame(ax, None)


def _frame(ax: Axes, color: str | None) -> None:
    """A coloured frame around ``ax``, or none when ``color`` is None."""
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color is not None:
            spine.set_color(color)
            spine.set_linewidth(3)


def _grid_axes(fig: Figure, count: int, cols: int) -> list[Axes]:
    """``count`` axes in rows of ``cols``; spare cells in the last row are hidden."""
    axes = fig.subplots(math.ceil(count / cols), cols, squeeze=False).ravel()
    for spare in axes[count:]:
        spare.set_axis_off()
    return list(axes[:count])


# ---------------------------------------------------------------- training curves


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Loss (train and val) and validation accuracy (top-1, top-5) per epoch, side by side.

    Args:
        history: one row per epoch with keys ``epoch``, ``phase``, ``train_loss``,
            ``val_loss``, ``val_acc`` and ``val_top5`` (accuracies as 0..1). A missing or
            None value leaves a gap; a series with no values is left out.
        path: where to write the PNG.

    Phases are alternately shaded, split by dashed lines and named above each panel; the
    best top-1 epoch is starred. Every point carries a marker, so one epoch still shows.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = np.array([row["epoch"] for row in history], dtype=float)
    phases = [str(row.get("phase") or "") for row in history]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    _plot_series(loss_ax, epochs, history, {"train_loss": "train", "val_loss": "val"})
    _plot_series(acc_ax, epochs, history, {"val_acc": "top-1", "val_top5": "top-5"}, scale=100)
    _star_best(acc_ax, epochs, _values(history, "val_acc") * 100)
    loss_ax.set(title="Loss", ylabel="cross-entropy")
    acc_ax.set(title="Validation accuracy", ylabel="accuracy")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(100))
    for ax in (loss_ax, acc_ax):
        _mark_phases(ax, epochs, phases)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    _save(fig, path)


def _values(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """``row[key]`` for every row as floats, NaN where missing or None."""
    return np.array([np.nan if row.get(key) is None else row[key] for row in history], dtype=float)


def _plot_series(
    ax: Axes,
    epochs: np.ndarray,
    history: Sequence[Mapping[str, Any]],
    labels: dict[str, str],
    scale: float = 1,
) -> None:
    """One line with markers per history key that has at least one value."""
    for key, label in labels.items():
        values = _values(history, key) * scale
        if np.isfinite(values).any():
            ax.plot(epochs, values, marker="o", markersize=4, label=label)


def _star_best(ax: Axes, epochs: np.ndarray, accuracy: np.ndarray) -> None:
    """A gold star (with a legend entry) on the epoch of highest accuracy, if there is one."""
    if not np.isfinite(accuracy).any():
        return
    best = int(np.nanargmax(accuracy))
    label = f"best {accuracy[best]:.1f}% (epoch {epochs[best]:g})"
    ax.plot(epochs[best], accuracy[best], "*", color="gold", markeredgecolor="black", markersize=15, label=label)


def _mark_phases(ax: Axes, epochs: np.ndarray, phases: list[str]) -> None:
    """Shade every other phase, draw a dashed line at each change, name the phases on top."""
    starts = [0] + [i for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
    edges = np.concatenate([[epochs[0] - 0.5], (epochs[1:] + epochs[:-1]) / 2, [epochs[-1] + 0.5]])
    centres = []
    for n, (first, stop) in enumerate(zip(starts, starts[1:] + [len(phases)], strict=True)):
        left, right = edges[first], edges[stop]
        centres.append((left + right) / 2)
        if n % 2:
            ax.axvspan(left, right, color="0.5", alpha=0.12, linewidth=0)
        if n:
            ax.axvline(left, color="0.4", linestyle="--", linewidth=1)
    ax.set_xlim(edges[0], edges[-1])
    if any(phases):
        top = ax.secondary_xaxis("top")
        top.set_xticks(centres, labels=[phases[i] for i in starts], fontsize=9, color="0.3")
        top.tick_params(length=0)


# ---------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(matrix: Any, classes: Sequence[str], path: str | os.PathLike, normalize: bool = True) -> None:
    """A confusion matrix: rows are true classes, columns predicted classes.

    Args:
        matrix: [K, K] counts, ``matrix[true, predicted]``.
        classes: the K class names, used as tick labels.
        path: where to write the PNG.
        normalize: colour by the share of each true class (row-normalised, 0..100%),
            so small classes read as clearly as big ones; False colours by raw count.

    With at most ANNOTATE_MAX_CLASSES classes every non-zero cell shows its count (and
    its row share when normalised). The title gives the overall accuracy (trace / total).
    """
    counts = _as_array(matrix).astype(np.float64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"matrix shape {counts.shape} does not match {k} classes")
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    shown, top = (rates, 1.0) if normalize else (counts, max(counts.max(), 1.0))
    side = min(4 + 0.55 * k, 15)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=top)
    bar = fig.colorbar(image, ax=ax, shrink=0.8, format=PercentFormatter(1) if normalize else None)
    bar.set_label("share of true class" if normalize else "count")
    if k <= ANNOTATE_MAX_CLASSES:
        _annotate_cells(ax, counts, rates if normalize else None, shown / top)
    _label_classes(ax, classes)
    ax.set(xlabel="predicted", ylabel="true", title=_accuracy_title(counts))
    _save(fig, path)


def _annotate_cells(ax: Axes, counts: np.ndarray, rates: np.ndarray | None, shade: np.ndarray) -> None:
    """Count (and row share) in each non-zero cell, white on dark cells, black on light ones."""
    size = 9 if len(counts) <= 10 else 7
    for (i, j), count in np.ndenumerate(counts):
        if count == 0:
            continue
        text = f"{count:g}" if rates is None else f"{count:g}\n{_percent(rates[i, j])}"
        colour = "white" if shade[i, j] > 0.5 else "black"
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=size)


def _percent(rate: float) -> str:
    """A share as a whole percentage, with '<1%' rather than a misleading '0%' for a non-zero share."""
    return "<1%" if 0 < rate < 0.005 else f"{rate:.0%}"


def _label_classes(ax: Axes, classes: Sequence[str]) -> None:
    """Class names on both axes, the predicted ones rotated; none when there are too many to read."""
    if len(classes) > TICK_LABEL_MAX_CLASSES:
        return
    ticks = np.arange(len(classes))
    size = float(np.clip(0.6 * 72 * ax.figure.get_figheight() * 0.8 / len(classes), 4, 9))  # fit a row
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=size)
    ax.set_yticks(ticks, labels=classes, fontsize=size)


def _accuracy_title(counts: np.ndarray) -> str:
    """'Confusion matrix: accuracy 91.2% of 10,000 images', from the diagonal."""
    total = counts.sum()
    if total == 0:
        return "Confusion matrix (no images)"
    return f"Confusion matrix: accuracy {np.trace(counts) / total:.1%} of {total:,.0f} images"


# ---------------------------------------------------------------- predictions


def plot_predictions(
    images: Any,
    labels: Any,
    probs: Any,
    classes: Sequence[str],
    path: str | os.PathLike,
    num_images: int = 16,
    num_bars: int = 4,
    k: int = 5,
) -> None:
    """A grid of predictions, each titled "pred (p%)" over "true: name", green if right, red if wrong.

    Args:
        images: [N, C, H, W] uint8 (C = 1 grey or 3 RGB) at source size.
        labels: [N] true class indices.
        probs: [N, K] predicted probabilities, K = len(classes).
        classes: the class names.
        path: where to write the PNG.
        num_images: show at most this many (the first ones).
        num_bars: the first this many images get a top-k bar chart beside them, the
            true class's bar in green (and the top bar in red when the prediction is wrong).
        k: bars per chart, clamped to 1..K.
    """
    images, labels, probs = _as_array(images), _as_array(labels).astype(np.int64), _as_array(probs)
    _check_predictions(images, labels, probs, classes)
    n = min(num_images, len(images))
    if n < 1:
        raise ValueError("no images to plot")
    bars, k = max(0, min(num_bars, n)), max(1, min(k, len(classes)))
    pair_rows, grid_count = math.ceil(bars / 2), n - bars
    heights = {"bars": pair_rows * max(2.4, 0.3 * k + 1.2)}
    heights["grid"] = math.ceil(grid_count / GRID_COLUMNS) * (CELL_INCHES + 0.5)
    heights = {name: h for name, h in heights.items() if h > 0}
    fig = Figure(figsize=(12, sum(heights.values()) + 0.4), layout="constrained")
    subfigs = fig.subfigures(len(heights), 1, height_ratios=list(heights.values()), squeeze=False).ravel()
    parts = dict(zip(heights, subfigs, strict=True))
    pairs = _pair_axes(parts["bars"], bars) if bars else []
    for i, (image_ax, bar_ax) in enumerate(pairs):
        _draw_prediction(image_ax, images[i], labels[i], probs[i], classes)
        _draw_topk(bar_ax, probs[i], labels[i], classes, k)
    grid = _grid_axes(parts["grid"], grid_count, GRID_COLUMNS) if grid_count else []
    for ax, i in zip(grid, range(bars, n), strict=True):
        _draw_prediction(ax, images[i], labels[i], probs[i], classes)
    right = int((probs[:n].argmax(axis=1) == labels[:n]).sum())
    fig.suptitle(f"Predictions: {right} of {n} right", fontsize=13)
    _save(fig, path)


def _check_predictions(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> None:
    """Raise ValueError unless images, labels, probs and classes agree in shape."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3, got shape {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels shape {labels.shape} does not match {len(images)} images")
    if probs.shape != (len(images), len(classes)):
        raise ValueError(f"probs shape {probs.shape} is not ({len(images)} images, {len(classes)} classes)")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must lie in 0..{len(classes) - 1}")


def _pair_axes(fig: Figure, count: int) -> list[tuple[Axes, Axes]]:
    """``count`` (image, bar chart) axis pairs, two pairs a row, the bar chart the wider."""
    per_row = 2
    grid = fig.add_gridspec(math.ceil(count / per_row), 2 * per_row, width_ratios=[1, 1.6] * per_row)
    cells = [divmod(i, per_row) for i in range(count)]
    return [(fig.add_subplot(grid[r, 2 * c]), fig.add_subplot(grid[r, 2 * c + 1])) for r, c in cells]


def _draw_prediction(ax: Axes, image: np.ndarray, label: int, probs: np.ndarray, classes: Sequence[str]) -> None:
    """The image framed and titled in green (right) or red (wrong)."""
    pred = int(probs.argmax())
    colour = RIGHT if pred == label else WRONG
    _show(ax, image)
    _frame(ax, colour)
    ax.set_title(f"{classes[pred]} ({probs[pred]:.0%})\ntrue: {classes[label]}", color=colour, fontsize=9)


def _draw_topk(ax: Axes, probs: np.ndarray, label: int, classes: Sequence[str], k: int) -> None:
    """Horizontal bars of the k most probable classes, most probable on top."""
    order = np.argsort(-probs, kind="stable")[:k]
    colours = [RIGHT if c == label else WRONG if rank == 0 else NEUTRAL for rank, c in enumerate(order)]
    y = np.arange(len(order))
    bars = ax.barh(y, probs[order], color=colours)
    ax.bar_label(bars, labels=[f"{p:.0%}" for p in probs[order]], padding=2, fontsize=8)
    ax.set_yticks(y, labels=[classes[c] for c in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.2)
    ax.set_xticks([0, 0.5, 1])
    ax.xaxis.set_major_formatter(PercentFormatter(1))
    ax.tick_params(axis="x", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    missing = "" if label in order else f" (true class at {probs[label]:.1%})"
    ax.set_title(f"top-{len(order)}{missing}", fontsize=9)


# ---------------------------------------------------------------- augmentations


def plot_augmentations(original: Any, augmented: Any, path: str | os.PathLike) -> None:
    """The original image, then each augmented version, in rows of up to GRID_COLUMNS.

    Args:
        original: [C, H, W] uint8 or float (C = 1 or 3).
        augmented: [M, C, H, W], uint8 or float in any range (e.g. mean/std normalised).
        path: where to write the PNG.

    Float images are min-max rescaled per image to 0..1 for display, so a normalised
    tensor looks right, but brightness and contrast jitter show only relative to each
    image's own range; uint8 images are shown as they are.
    """
    original, augmented = _as_array(original), _as_array(augmented)
    if augmented.ndim != 4:
        raise ValueError(f"augmented must be [M, C, H, W], got shape {augmented.shape}")
    panels = [("original", original)] + [(f"augmented {i}", image) for i, image in enumerate(augmented, 1)]
    cols = min(GRID_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(cols * CELL_INCHES, rows * (CELL_INCHES + 0.3)), layout="constrained")
    for ax, (title, image) in zip(_grid_axes(fig, len(panels), cols), panels, strict=True):
        _show(ax, image)
        ax.set_title(title, fontsize=9, fontweight="bold" if title == "original" else "normal")
    _save(fig, path)


# ---------------------------------------------------------------- calibration


def plot_reliability(
    labels: Any, panels: Mapping[str, Any], path: str | os.PathLike, bins: int = CALIBRATION_BINS
) -> None:
    """Reliability diagrams side by side: one column per set of probabilities for the same images.

    Args:
        labels: [N] true class indices.
        panels: title -> [N, K] probabilities (e.g. ``{"before (T = 1)": raw, "after (T = 0.72)": calibrated}``).
        path: where to write the PNG.
        bins: equal-width bins of top-1 confidence.

    Each column: on top, the share of images per confidence bin; below, each bin's accuracy (bars)
    against its mean confidence (the gap shaded red), with the diagonal where a perfectly calibrated
    model's bars would end. The title gives the ECE.
    """
    labels = _as_array(labels)
    if not panels:
        raise ValueError("no probabilities to plot")
    fig = Figure(figsize=(5 * len(panels), 6), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex=True, height_ratios=[1, 3])
    width = 1.0 / bins
    lefts = np.arange(bins) * width
    for column, (title, probs) in enumerate(panels.items()):
        probs = _as_array(probs)
        if probs.ndim != 2 or len(probs) != len(labels):
            raise ValueError(f"{title}: probabilities {probs.shape} do not match {len(labels)} labels")
        table = reliability_bins(probs, labels, bins)
        _draw_bin_shares(axes[0, column], lefts, width, table["count"])
        _draw_reliability(axes[1, column], lefts, width, table)
        ece = expected_calibration_error(probs, labels, bins)
        axes[0, column].set_title(f"{title}: ECE {100 * ece:.2f} %", fontsize=11)
    _save(fig, path)


def _draw_bin_shares(ax: Axes, lefts: np.ndarray, width: float, count: np.ndarray) -> None:
    share = count / max(count.sum(), 1)
    ax.bar(lefts, share, width=width, align="edge", color=NEUTRAL, edgecolor="0.4", linewidth=0.5)
    ax.yaxis.set_major_formatter(PercentFormatter(1))
    ax.set_ylabel("images")
    ax.grid(alpha=0.3)


def _draw_reliability(ax: Axes, lefts: np.ndarray, width: float, table: Mapping[str, np.ndarray]) -> None:
    filled = table["count"] > 0
    accuracy, confidence = table["accuracy"][filled], table["confidence"][filled]
    ax.bar(lefts[filled], accuracy, width=width, align="edge", color="tab:blue", edgecolor="black",
           linewidth=0.5, label="accuracy")  # fmt: skip
    gap_bottom = np.minimum(accuracy, confidence)
    ax.bar(lefts[filled], np.abs(confidence - accuracy), bottom=gap_bottom, width=width, align="edge",
           color=WRONG, alpha=0.35, hatch="//", edgecolor=WRONG, linewidth=0.5, label="gap to confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="0.3", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 probability (confidence)", ylabel="accuracy")
    ax.xaxis.set_major_formatter(PercentFormatter(1))
    ax.yaxis.set_major_formatter(PercentFormatter(1))
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
