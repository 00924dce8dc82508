"""`fmtl infer`: classify files, folders and globs with an exported model, as a table, CSV or JSON.

The library behind the command (fmtl/cli.py only parses options and calls ``run``).
Torch-free: it needs onnxruntime, numpy, pillow and, for the progress bar, tqdm.

Every image found gets one row: its path and top-k labels with probabilities, or the
reason it could not be read (also said on stderr); one unreadable file never stops the
others. Rows stream out a batch at a time (to stdout, or to a temporary file renamed over
``-o`` at the end), so memory does not grow with the number of images. The exit code is 0
when at least one image was classified, else 1.

Names are untrusted text (fmtl.runtime.text): bytes of a file name that are not UTF-8 are
written as backslash escapes in every format; the table (and stderr) also shows control
characters and terminal escapes escaped; CSV cells a spreadsheet would run as a formula
start with ``'``. With ``min_probability``, a row whose top-1 probability is below it is
marked unsure (JSON ``"unsure": true``, a CSV column, ``unsure:`` in the table), its top-k
still listed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fmtl.atomic import atomic_open
from fmtl.errors import FmtlError
from fmtl.runtime.classifier import Classifier, ModelError, check_min_probability
from fmtl.runtime.image_files import collect_image_paths
from fmtl.runtime.images import DEFAULT_MAX_PIXELS, iter_decoded
from fmtl.runtime.results import Row, classify_decoded
from fmtl.runtime.text import csv_cell, shown_name, terminal_text

__all__ = ["FORMATS", "InferError", "Row", "find_newest_model", "format_stream", "iter_rows", "load_classifier", "run"]

FORMATS = ("table", "csv", "json", "jsonl")
DEFAULT_MODEL_FOLDER = "export"

Echo = Callable[[str], object]


class InferError(FmtlError):
    """A user error (bad model, bad option): the CLI prints the message on one line and exits non-zero."""


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
    min_probability: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> int:
    """Classify every image in ``inputs`` and write one row per image; return the exit code.

    Args:
        inputs: files, folders and glob patterns (see fmtl.runtime.image_files.collect_image_paths).
        model: an fmtl .onnx file, or None for the newest one in export/.
        k: predictions per image, clamped to the number of classes.
        batch_size: images decoded and classified at a time.
        fmt: "table", "csv", "json" or "jsonl".
        output: file to write (atomically), or None for ``echo`` (stdout).
        recursive: walk folders to any depth instead of their direct children.
        progress: show a progress bar on stderr (only when stderr is a terminal).
        echo, echo_err: where results and messages go (print to stdout / stderr by default).
        min_probability: mark images whose top-1 probability is below it as unsure (None: no marking).
        max_pixels: images with more pixels are error rows, refused before decoding (see decode_image).

    Returns:
        0 when at least one image was classified, 1 when none was.

    Raises:
        InferError: bad options, or no usable model.
    """
    _check_options(k, batch_size, fmt, min_probability, max_pixels)
    classifier = load_classifier(model, echo_err)
    paths, problems = collect_image_paths(inputs, recursive)
    for item, reason in problems:
        echo_err(f"warning: {terminal_text(item)}: {reason}")
    tally = Tally()
    rows = tally.count(iter_rows(classifier, paths, k, batch_size, progress, echo_err, min_probability, max_pixels))
    width = max((len(terminal_text(str(p))) for p in paths), default=0)
    chunks = format_stream(rows, fmt, classifier, k, width, min_probability)
    if output:
        # Rows go to a temporary file as they come; it replaces ``output`` only once complete.
        with atomic_open(output, "w", encoding="utf-8", newline="") as handle:
            for chunk in chunks:
                handle.write(chunk)
        echo_err(f"wrote {tally.rows} rows to {terminal_text(str(output))}")
    else:
        for chunk in chunks:
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


def _check_options(k: int, batch_size: int, fmt: str, min_probability: float | None, max_pixels: int) -> None:
    if max_pixels < 1:
        raise InferError(f"--max-pixels must be at least 1, got {max_pixels}")
    if min_probability is not None and not 0.0 <= min_probability <= 1.0:
        raise InferError(f"--min-probability must be within 0..1, got {min_probability}")
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
    echo_err(f"model: {terminal_text(str(path))} ({terminal_text(arch)}, {classifier.num_classes} classes{how})")
    return classifier


def iter_rows(
    classifier: Classifier,
    paths: Sequence[Path],
    k: int,
    batch_size: int,
    progress: bool = False,
    echo_err: Echo = _print_err,
    min_probability: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[Row]:
    """Decode (in a thread pool, one batch ahead) and classify ``paths``, yielding one Row per path in
    order, a batch at a time: memory holds one batch of images and rows, however many paths.
    Each unreadable file is also said on stderr (``echo_err``)."""
    check_min_probability(min_probability)
    spec = classifier.spec
    batches = iter_decoded(
        paths, spec.channels, spec.source_size, spec.background, batch_size, max_pixels=max_pixels, fit=spec.fit
    )
    with _progress_bar(len(paths), progress, echo_err) as (update, say):
        for start, decoded in zip(range(0, len(paths), batch_size), batches, strict=True):
            names = [str(p) for p in paths[start : start + batch_size]]
            for row in classify_decoded(classifier, names, decoded, k, min_probability, batch_size):
                if row.error is not None:
                    say(f"error: {terminal_text(row.path)}: {row.error}")
                yield row
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


def format_stream(
    rows: Iterable[Row], fmt: str, classifier: Classifier, k: int, width: int, min_probability: float | None = None
) -> Iterator[str]:
    """Rows as text in ``fmt``, one chunk per row (plus a header or an envelope), each ending in a newline.

    ``width`` pads the table's path column (the longest path as ``terminal_text`` shows it, known before
    the rows are). ``min_probability`` adds the CSV ``unsure`` column and the JSON envelope's field.
    """
    k = max(1, min(k, classifier.num_classes))
    if fmt == "table":
        return (_table_line(row, width) for row in rows)
    if fmt == "csv":
        return _csv(rows, k, min_probability is not None)
    if fmt == "json":
        return _json(rows, classifier, k, min_probability)
    if fmt == "jsonl":
        return (json.dumps(row.to_dict()) + "\n" for row in rows)
    raise InferError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _json(rows: Iterable[Row], classifier: Classifier, k: int, min_probability: float | None) -> Iterator[str]:
    """One JSON document, written as it goes: the envelope, then the predictions one by one."""
    envelope = {"model": shown_name(str(classifier.path)), "architecture": shown_name(classifier.architecture),
                "classes": [shown_name(c) for c in classifier.classes], "k": k}  # fmt: skip
    if min_probability is not None:
        envelope["min_probability"] = min_probability
    head = json.dumps(envelope, indent=2)[:-2]  # without the closing "\n}"
    yield head + ',\n  "predictions": [\n'
    previous = None  # held back one row: only the last has no comma after it
    for row in rows:
        if previous is not None:
            yield f"    {previous},\n"
        previous = json.dumps(row.to_dict())
    yield ("" if previous is None else f"    {previous}\n") + "  ]\n}\n"


def _table_line(row: Row, width: int) -> str:
    """path, padded, then "label 97.1%, label 2.0%" (or "error: reason"), "unsure: " before an unsure
    row's labels; names with control characters and terminal escapes escaped."""
    if row.error is not None:
        text = f"error: {terminal_text(row.error)}"
    else:
        text = ("unsure: " if row.unsure else "") + ", ".join(
            f"{terminal_text(p.label)} {p.probability:.1%}" for p in row.predictions
        )
    return f"{terminal_text(row.path):<{width}}  {text}\n"


def _csv(rows: Iterable[Row], k: int, with_unsure: bool) -> Iterator[str]:
    """Header path,rank1_label,rank1_prob,...,rankK_label,rankK_prob[,unsure],error; blank cells where n/a.
    Text cells go through ``csv_cell`` (undecodable bytes escaped, formulas made text)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")

    def line(cells: list[str]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(cells)
        return buffer.getvalue()

    ranks = [f"rank{r}_{what}" for r in range(1, k + 1) for what in ("label", "prob")]
    yield line(["path", *ranks, *(["unsure"] if with_unsure else []), "error"])
    for row in rows:
        cells = [cell for p in row.predictions for cell in (csv_cell(p.label), f"{p.probability:.6f}")]
        unsure = ["" if row.unsure is None else str(row.unsure).lower()] if with_unsure else []
        yield line([csv_cell(row.path), *cells, *[""] * (2 * k - len(cells)), *unsure, csv_cell(row.error or "")])
