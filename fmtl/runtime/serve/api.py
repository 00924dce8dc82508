"""Request handling for `fmtl serve` that does not depend on the HTTP engine: bytes and parameters in,
images and options out, or an ``ApiError`` with a 4xx status (the answer itself is
``fmtl.runtime.results.Row.to_dict``, as for `fmtl infer`).

Everything here is synchronous and pure, so any front end can call it: Starlette runs the
multipart parsing in its decoding pool (never on the event loop), and another engine (Ray Serve)
can reuse the same functions and give byte-for-byte the same answers. Every hostile input ends in a
result or an ``ApiError``; nothing here raises anything else.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Sequence

import numpy as np
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from fmtl.errors import one_line

RAW_TYPES = ("application/octet-stream", "")  # plus image/*; no Content-Type at all is what `curl -T` sends
MULTIPART = "multipart/form-data"
MAX_K = 1_000_000  # larger k is refused; any k above the number of classes lists every class
DEFAULT_K = 5
DISCARD_BYTES = 65536  # an unread body up to this size is dropped so that a refusal keeps its connection


def small_enough_to_drop(content_length: str | bytes) -> bool:
    """A Content-Length (as sent) of at most DISCARD_BYTES: a body that size is read and dropped after
    a refusal, cheaper for both sides than making the client open a new connection."""
    digits = content_length.isascii() and content_length.isdigit()
    return digits and len(content_length) <= 6 and int(content_length) <= DISCARD_BYTES


class ApiError(Exception):
    """An answer other than 200: status, one-line message, extra headers; ``reason`` labels the metric."""

    def __init__(self, status: int, message: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, "bad_request")


def parse_k(text: str | None) -> int:
    """``?k=``: a whole number from 1 to MAX_K in ASCII digits (``k=²`` and 5,000 digits are 400s)."""
    if text is None:
        return DEFAULT_K
    if not re.fullmatch(r"[0-9]{1,7}", text, re.ASCII) or not 1 <= int(text) <= MAX_K:
        raise bad_request(f"k must be a whole number from 1 to {MAX_K}, got {text[:40]!r}")
    return int(text)


def parse_min_probability(text: str | None) -> float | None:
    """``?min_probability=``: a decimal number from 0 to 1 (None when absent)."""
    if text is None:
        return None
    if re.fullmatch(r"[0-9]{0,3}(\.[0-9]{1,16})?", text, re.ASCII) and text not in ("", "."):
        value = float(text)
        if 0.0 <= value <= 1.0:
            return value
    raise bad_request(f"min_probability must be a number from 0 to 1, got {text[:40]!r}")


def media_type(content_type: str) -> str:
    """The lower-case media type of a Content-Type header; 415 unless it is an image, raw bytes or multipart."""
    kind = content_type.split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind in RAW_TYPES or kind == MULTIPART):
        raise ApiError(415, f"unsupported content type {kind[:80]!r}: send the image as image/* or "
                       "application/octet-stream, or several as multipart/form-data", "unsupported_media_type")  # fmt: skip
    return kind


def image_payloads(body: bytes, content_type: str, max_images: int) -> tuple[list[bytes], list[str | None]]:
    """The encoded images of a classify request body and their names (multipart file names, else None)."""
    if media_type(content_type) != MULTIPART:
        return [body], [None]
    files = multipart_files(body, content_type, max_images)
    if not files:
        raise bad_request("no file in the multipart body (send each image as a file part)")
    return [data for _, data in files], [name for name, _ in files]


def multipart_files(body: bytes, content_type: str, max_files: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file part of a multipart/form-data body, in order.

    More than ``max_files`` file parts (or as many other fields) is a 413 as soon as the parser meets
    the next one, so a body of 100,000 empty parts costs no more than ``max_files`` of them."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("bad multipart body: no boundary in the Content-Type")
    charset = _charset(params.get(b"charset", b"utf-8"))
    reader = _PartReader(max_files, charset)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as error:
        raise bad_request(f"bad multipart body: {str(error)[:200]}") from None
    return reader.files


def _charset(name: bytes) -> str:
    try:
        return codecs.lookup(name.decode("latin-1")).name
    except LookupError:
        return "latin-1"


class _PartReader:
    """python-multipart callbacks that keep file parts in memory (the body is already bounded)."""

    def __init__(self, max_files: int, charset: str):
        self.max_files, self.charset = max_files, charset
        self.files: list[tuple[str, bytes]] = []
        self.fields = 0
        self.header_name, self.header_value = b"", b""
        self.disposition = b""
        self.chunks: list[bytes] = []

    def callbacks(self) -> dict[str, Callable]:
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data, "on_part_end": self.part_end,
                "on_header_field": self.header_field, "on_header_value": self.header_val,
                "on_header_end": self.header_end}  # fmt: skip

    def part_begin(self) -> None:
        self.disposition, self.chunks = b"", []

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def header_val(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.chunks.append(data[start:end])

    def part_end(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"filename" not in options:  # a plain form field: ignored, but counted
            self.fields += 1
            if self.fields > self.max_files:
                raise ApiError(413, f"more than {self.max_files} form fields in one request", "too_many_images")
            return
        if len(self.files) >= self.max_files:
            raise ApiError(413, f"more than {self.max_files} images in one request (limit {self.max_files})",
                           "too_many_images")  # fmt: skip
        name = options[b"filename"].decode(self.charset, errors="replace")
        self.files.append((name, b"".join(self.chunks)))


def no_readable_image(names: Sequence[str | None], decoded: Sequence[object]) -> ApiError | None:
    """The 400 for a request none of whose images could be decoded (None if any could)."""
    if any(isinstance(item, np.ndarray) for item in decoded):
        return None
    if len(decoded) == 1:
        return ApiError(400, one_line(f"not a readable image: {decoded[0]}", limit=None), "bad_image")
    reasons = "; ".join(f"{name}: {item}" for name, item in zip(names, decoded, strict=True))
    return ApiError(400, one_line(f"no readable image ({reasons})", limit=None), "bad_image")


def default_max_pixels(input_pixels: int) -> int:
    """The --max-pixels default for a model whose input has ``input_pixels`` pixels per image.

    1,024 times the model's input (a 28x28 model: 0.8 MP), but at least 16 MP, so that ordinary
    photos and scans pass however small the model, and at most 64 MP (fmtl's decoding limit)."""
    return int(min(64_000_000, max(16_000_000, 1024 * input_pixels)))
