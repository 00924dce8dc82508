"""`fmtl infer`: classify files, folders and globs with an exported model, as a table, CSV or JSON.

The library behind the command (fmtl/cli.py only parses options and calls ``run``).
Torch-free: it needs onnxruntime, numpy, pillow and, for the progress bar, tqdm.

Every image found gets one row: its path and top-k labels with probabilities, or the
reason it could not be read (also said on stderr); one unreadable file never stops the
others. Rows stream out a batch at a time (to stdout, or to a temporary file renamed over
``-o`` at the end), so memory does not grow with the number of images. The exit code is 0
when at least one image was classified, else 1.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmtl.atomic import atomic_open
from fmtl.errors import FmtlError
from fmtl.runtime.classifier import Classifier, ModelError, Prediction
from fmtl.runtime.images import DecodeError, collect_image_paths, iter_decoded

FORMATS = ("table", "csv", "json", "jsonl")
DEFAULT_MODEL_FOLDER = "export"

Echo = Callable[[str], object]


class InferError(FmtlError):
    """A user error (bad model, bad option): the CLI prints the message on one line and exits non-zero."""


@dataclass
class Row:
    """One image's result: its top-k predictions, or the reason it could not be read."""

    path: str
    predictions: list[Prediction] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        top = [{"label": p.label, "index": p.index, "probability": round(p.probability, 6)} for p in self.predictions]
        return {"path": self.path, "top_k": top, "error": self.error}


def _print_err(message: str) -> None:
    print(message, file=sys.stderr)  # sys.stderr looked up per call, so redirection and capture work


def find_newest_model(folder: str | Path = DEFAULT_MODEL_FOLDER) -> Path:
    """The most recently modified *.onnx file in ``folder``.

    Raises:
        InferError: the folder does not exist or holds no .onnx file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InferError(f"no --model given and no {folder}/ folder to pick one from: pass --model FILE.onnx")
    models = [p for p in folder.glob("*.onnx") if p.is_file()]
    if not models:
        raise InferError(f"no .onnx model in {folder}/: run `fmtl export --onnx RUN` or pass --model FILE.onnx")
    return max(models, key=lambda p: (p.stat().st_mtime, p.name))


def run(
    inputs: Sequence[str],
    model: str | None,
    k: int = 5,
    batch_size: int = 64,
    fmt: str = "table",
    output: str | None = None,
    recursive: bool = False,
    progress: bool = True,
    echo: Echo = print,
    echo_err: Echo = _print_err,
) -> int:
    """Classify every image in ``inputs`` and write one row per image; return the exit code.

    Args:
        inputs: files, folders and glob patterns (see fmtl.runtime.images.collect_image_paths).
        model: an fmtl .onnx file, or None for the newest one in export/.
        k: predictions per image, clamped to the number of classes.
        batch_size: images decoded and classified at a time.
        fmt: "table", "csv", "json" or "jsonl".
        output: file to write (atomically), or None for ``echo`` (stdout).
        recursive: walk folders to any depth instead of their direct children.
        progress: show a progress bar on stderr (only when stderr is a terminal).
        echo, echo_err: where results and messages go (print to stdout / stderr by default).

    Returns:
        0 when at least one image was classified, 1 when none was.

    Raises:
        InferError: bad options, or no usable model.
    """
    _check_options(k, batch_size, fmt)
    classifier = load_classifier(model, echo_err)
    paths, problems = collect_image_paths(inputs, recursive)
    for item, reason in problems:
        echo_err(f"warning: {item}: {reason}")
    tally = Tally()
    rows = tally.count(iter_rows(classifier, paths, k, batch_size, progress, echo_err))
    width = max((len(str(p)) for p in paths), default=0)
    if output:
        # Rows go to a temporary file as they come; it replaces ``output`` only once complete.
        with atomic_open(output, "w", encoding="utf-8", newline="") as handle:
            for chunk in format_stream(rows, fmt, classifier, k, width):
                handle.write(chunk)
        echo_err(f"wrote {tally.rows} rows to {output}")
    else:
        for chunk in format_stream(rows, fmt, classifier, k, width):
            echo(chunk.removesuffix("\n"))
    return _summarise(tally, echo_err)


@dataclass
class Tally:
    """Counts rows as they stream past, for the closing summary (no row is kept)."""

    rows: int = 0
    failed: int = 0

    def count(self, rows: Iterable[Row]) -> Iterator[Row]:
        for row in rows:
            self.rows += 1
            self.failed += row.error is not None
            yield row


def _check_options(k: int, batch_size: int, fmt: str) -> None:
    if k < 1:
        raise InferError(f"-k must be at least 1, got {k}")
    if batch_size < 1:
        raise InferError(f"--batch-size must be at least 1, got {batch_size}")
    if fmt not in FORMATS:
        raise InferError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def load_classifier(model: str | None, echo_err: Echo = _print_err) -> Classifier:
    """Open ``model`` (or the newest model in export/) and say on stderr which one is used."""
    path = Path(model) if model else find_newest_model()
    try:
        classifier = Classifier(path)
    except ModelError as error:
        raise InferError(str(error)) from None
    how = "" if model else f", newest in {DEFAULT_MODEL_FOLDER}/"
    arch = classifier.architecture or "unknown architecture"
    echo_err(f"model: {path} ({arch}, {classifier.num_classes} classes{how})")
    return classifier


def classify_paths(
    classifier: Classifier,
    paths: Sequence[Path],
    k: int,
    batch_size: int,
    progress: bool = False,
    echo_err: Echo = _print_err,
) -> list[Row]:
    """All of ``iter_rows`` as a list: one Row per path, in order."""
    return list(iter_rows(classifier, paths, k, batch_size, progress, echo_err))


def iter_rows(
    classifier: Classifier,
    paths: Sequence[Path],
    k: int,
    batch_size: int,
    progress: bool = False,
    echo_err: Echo = _print_err,
) -> Iterator[Row]:
    """Decode (in a thread pool, one batch ahead) and classify ``paths``, yielding one Row per path in
    order, a batch at a time: memory holds one batch of images and rows, however many paths."""
    spec = classifier.spec
    batches = iter_decoded(paths, spec.channels, spec.source_size, spec.background, batch_size=batch_size)
    with _progress_bar(len(paths), progress, echo_err) as (update, say):
        for start, decoded in zip(range(0, len(paths), batch_size), batches, strict=True):
            names = [str(p) for p in paths[start : start + batch_size]]
            good = [i for i, item in enumerate(decoded) if not isinstance(item, DecodeError)]
            if good:
                probs = classifier.predict_proba(np.stack([decoded[i] for i in good]), batch_size)
                by_index = dict(zip(good, classifier.top_k(probs, k), strict=True))
            for i, (name, item) in enumerate(zip(names, decoded, strict=True)):
                if isinstance(item, DecodeError):
                    say(f"error: {name}: {item}")
                    yield Row(name, error=str(item))
                else:
                    yield Row(name, by_index[i])
            update(len(decoded))


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool, echo_err: Echo) -> Iterator[tuple[Callable[[int], object], Echo]]:
    """(update(n), say(message)) for a tqdm bar on stderr; say() prints a message without tearing the bar.

    The bar shows only when asked for, on a terminal, and when tqdm is installed."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional for the runtime
        tqdm = None
    if tqdm is None or not enabled or not sys.stderr.isatty():
        yield (lambda n: None), echo_err
        return
    with tqdm(total=total, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:

        def say(message: str) -> None:
            with tqdm.external_write_mode(file=sys.stderr):
                echo_err(message)

        yield bar.update, say


def _summarise(tally: Tally, echo_err: Echo) -> int:
    classified = tally.rows - tally.failed
    if not tally.rows:
        echo_err("error: no images found")
        return 1
    if not classified:
        echo_err(f"error: none of the {tally.failed} images could be read")
        return 1
    echo_err(f"{classified} images classified" + (f", {tally.failed} unreadable" if tally.failed else ""))
    return 0


# --- output formats --------------------------------------------------------------------------------


def format_rows(rows: Sequence[Row], fmt: str, classifier: Classifier, k: int) -> str:
    """Rows as text in ``fmt`` (table, csv, json, jsonl), ending in a newline unless empty."""
    width = max((len(row.path) for row in rows), default=0)
    return "".join(format_stream(rows, fmt, classifier, k, width))


def format_stream(rows: Iterable[Row], fmt: str, classifier: Classifier, k: int, width: int) -> Iterator[str]:
    """Rows as text in ``fmt``, one chunk per row (plus a header or an envelope), each ending in a newline.

    ``width`` pads the table's path column (the longest path, known before the rows are).
    """
    k = max(1, min(k, classifier.num_classes))
    if fmt == "table":
        return (_table_line(row, width) for row in rows)
    if fmt == "csv":
        return _csv(rows, k)
    if fmt == "json":
        return _json(rows, classifier, k)
    if fmt == "jsonl":
        return (json.dumps(row.to_dict()) + "\n" for row in rows)
    raise InferError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _json(rows: Iterable[Row], classifier: Classifier, k: int) -> Iterator[str]:
    """One JSON document, written as it goes: the envelope, then the predictions one by one."""
    envelope = {"model": str(classifier.path), "architecture": classifier.architecture,
                "classes": classifier.classes, "k": k}  # fmt: skip
    head = json.dumps(envelope, indent=2)[:-2]  # without the closing "\n}"
    yield head + ',\n  "predictions": [\n'
    previous = None  # held back one row: only the last has no comma after it
    for row in rows:
        if previous is not None:
            yield f"    {previous},\n"
        previous = json.dumps(row.to_dict())
    yield ("" if previous is None else f"    {previous}\n") + "  ]\n}\n"


def _table_line(row: Row, width: int) -> str:
    """path, padded, then "label 97.1%, label 2.0%" (or "error: reason")."""
    text = f"error: {row.error}" if row.error else ", ".join(f"{p.label} {p.probability:.1%}" for p in row.predictions)
    return f"{row.path:<{width}}  {text}\n"


def _csv(rows: Iterable[Row], k: int) -> Iterator[str]:
    """Header path,rank1_label,rank1_prob,...,rankK_label,rankK_prob,error; blank cells where n/a."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")

    def line(cells: list[str]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(cells)
        return buffer.getvalue()

    yield line(["path", *[f"rank{r}_{what}" for r in range(1, k + 1) for what in ("label", "prob")], "error"])
    for row in rows:
        cells = [cell for p in row.predictions for cell in (p.label, f"{p.probability:.6f}")]
        yield line([row.path, *cells, *[""] * (2 * k - len(cells)), row.error or ""])
