"""One path from decoded images to result rows, and one JSON shape for them, for `fmtl infer`, Ray and serve alike.

    decoded = decode_many(sources, ...)                     # arrays, a DecodeError in place of a failure
    rows = classify_decoded(classifier, names, decoded, k)  # keep the good -> predict -> top-k -> rows

A caller that runs the model its own way (serve's batcher awaits it) uses the two halves:
``good, batch = keep_decoded(decoded)``, its own probabilities for ``batch``, then
``make_rows(classifier, names, decoded, good, probs, k, min_probability)``. ``Row.to_dict``
is the one JSON shape of a result: `fmtl infer`'s json and jsonl, the Ray engine's jsonl part
files and serve's ``predictions`` are lists of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fmtl.runtime.classifier import Classifier, Prediction
from fmtl.runtime.images import DecodeError
from fmtl.runtime.text import shown_name

Decoded = np.ndarray | DecodeError


@dataclass
class Row:
    """One image's result: its top-k predictions, or the reason it could not be read.

    ``path`` is None for an image that came without a name (a raw upload to serve). ``unsure`` is
    None when no ``min_probability`` was asked for (and for error rows), else whether the top-1
    probability is below it.
    """

    path: str | None
    predictions: list[Prediction] = field(default_factory=list)
    error: str | None = None
    unsure: bool | None = None

    def to_dict(self) -> dict:
        """The JSON shape: path (undecodable bytes of a file name as backslash escapes), top_k, error,
        and ``unsure`` when a threshold was asked for."""
        top = [
            {"label": shown_name(p.label), "index": p.index, "probability": round(p.probability, 6)}
            for p in self.predictions
        ]
        item = {"path": None if self.path is None else shown_name(self.path), "top_k": top, "error": self.error}
        if self.unsure is not None:
            item["unsure"] = self.unsure
        return item


def keep_decoded(decoded: Sequence[Decoded]) -> tuple[list[int], np.ndarray | None]:
    """(indices of the images that decoded, their uint8 batch or None when none did)."""
    good = [i for i, item in enumerate(decoded) if not isinstance(item, DecodeError)]
    return good, (np.stack([decoded[i] for i in good]) if good else None)


def make_rows(
    classifier: Classifier,
    names: Sequence[str | None],
    decoded: Sequence[Decoded],
    good: Sequence[int],
    probs: np.ndarray | None,
    k: int,
    min_probability: float | None = None,
) -> list[Row]:
    """One Row per name, in order: the top-k of ``probs`` (one row per index in ``good``) or the DecodeError."""
    tops = dict(zip(good, classifier.top_k(probs, k, min_probability), strict=True)) if good else {}
    rows = []
    for i, (name, item) in enumerate(zip(names, decoded, strict=True)):
        if isinstance(item, DecodeError):
            rows.append(Row(name, error=str(item)))
        else:
            top = tops[i]
            rows.append(Row(name, list(top), unsure=None if min_probability is None else top.unsure))
    return rows


def classify_decoded(
    classifier: Classifier,
    names: Sequence[str],
    decoded: Sequence[Decoded],
    k: int,
    min_probability: float | None = None,
    batch_size: int = 64,
) -> list[Row]:
    """Classify the images that decoded and return one Row per name, in order (errors as error rows).

    Args:
        classifier: the model.
        names: what each row is called (a path), one per item of ``decoded``.
        decoded: uint8 arrays at the model's input shape, or a DecodeError for each failure.
        k: predictions per image, clamped to 1..num_classes.
        min_probability: mark rows whose top-1 probability is below it ``unsure`` (None: no marking).
        batch_size: images per onnxruntime call.
    """
    good, batch = keep_decoded(decoded)
    probs = classifier.predict_proba(batch, batch_size) if batch is not None else None
    return make_rows(classifier, names, decoded, good, probs, k, min_probability)
