"""`fmtl infer`: classify files, folders and globs with an exported model, as a table, CSV or JSON.

The library behind the command (fmtl/cli.py only parses options and calls ``run``).
Torch-free: it needs onnxruntime, numpy, pillow and, for the progress bar, tqdm.

Every image found gets one row: its path and top-k labels with probabilities, or the
reason it could not be read (also said on stderr); one unreadable file never stops the
others. The exit code is 0 when at least one image was classified, else 1.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmtl.atomic import atomic_write_text
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
    rows = classify_paths(classifier, paths, k, batch_size, progress, echo_err)
    text = format_rows(rows, fmt, classifier, k)
    if output:
        atomic_write_text(output, text)
        echo_err(f"wrote {len(rows)} rows to {output}")
    elif text:
        echo(text.rstrip("\n"))
    return _summarise(rows, echo_err)


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
    """Decode (in a thread pool, one batch ahead) and classify ``paths``; one Row per path, in order."""
    spec = classifier.spec
    rows: list[Row] = []
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
                    rows.append(Row(name, error=str(item)))
                else:
                    rows.append(Row(name, by_index[i]))
            update(len(decoded))
    return rows


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


def _summarise(rows: Sequence[Row], echo_err: Echo) -> int:
    failed = sum(row.error is not None for row in rows)
    classified = len(rows) - failed
    if not rows:
        echo_err("error: no images found")
        return 1
    if not classified:
        echo_err(f"error: none of the {failed} images could be read")
        return 1
    echo_err(f"{classified} images classified" + (f", {failed} unreadable" if failed else ""))
    return 0


# --- output formats --------------------------------------------------------------------------------


def format_rows(rows: Sequence[Row], fmt: str, classifier: Classifier, k: int) -> str:
    """Rows as text in ``fmt`` (table, csv, json, jsonl), ending in a newline unless empty."""
    k = max(1, min(k, classifier.num_classes))
    if fmt == "table":
        return _table(rows)
    if fmt == "csv":
        return _csv(rows, k)
    if fmt == "json":
        document = {
            "model": str(classifier.path),
            "architecture": classifier.architecture,
            "classes": classifier.classes,
            "k": k,
            "predictions": [row.to_dict() for row in rows],
        }
        return json.dumps(document, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(row.to_dict()) + "\n" for row in rows)
    raise InferError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _table(rows: Sequence[Row]) -> str:
    """path, padded, then "label 97.1%, label 2.0%" (or "error: reason")."""
    width = max((len(row.path) for row in rows), default=0)
    lines = []
    for row in rows:
        text = (
            f"error: {row.error}" if row.error else ", ".join(f"{p.label} {p.probability:.1%}" for p in row.predictions)
        )
        lines.append(f"{row.path:<{width}}  {text}")
    return "".join(line + "\n" for line in lines)


def _csv(rows: Sequence[Row], k: int) -> str:
    """Header path,rank1_label,rank1_prob,...,rankK_label,rankK_prob,error; blank cells where n/a."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *[f"rank{r}_{what}" for r in range(1, k + 1) for what in ("label", "prob")], "error"])
    for row in rows:
        cells = [cell for p in row.predictions for cell in (p.label, f"{p.probability:.6f}")]
        writer.writerow([row.path, *cells, *[""] * (2 * k - len(cells)), row.error or ""])
    return buffer.getvalue()
