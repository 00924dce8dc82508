"""The Open Inference Protocol (KServe v2) infer request and response, with the binary tensor data extension.

A request carries one UINT8 tensor ``images`` [N, C, H, W], either as JSON numbers under ``data`` or,
with the binary tensor data extension, as raw bytes after the JSON header: the
``Inference-Header-Content-Length`` header gives the JSON's length and the input's
``parameters.binary_data_size`` its byte count. The answer is the FP32 tensor ``probs`` [N, classes],
as JSON numbers or, when the request asks (``parameters.binary_data_output``, or ``binary_data`` on
the requested output), as little-endian bytes after the JSON. This is what NVIDIA's ``tritonclient``
and KServe's clients send and expect by default.

Parsing is pure (bytes in, a batch or ``V2RequestError`` out) and CPU-heavy, so the server runs it in
its decoding pool. Any body, however hostile, ends in a parsed request or a ``V2RequestError`` with a
one-line message; nothing here raises anything else.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass

import numpy as np

from fmtl.errors import FmtlError
from fmtl.spec import ONNX_INPUT, ONNX_OUTPUT

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)  # what GET /v2 lists
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"  # Triton's content type for a JSON header followed by binary tensors
_ZLIB_WINDOW = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # Content-Encoding -> zlib wbits
# JSON bytes other than whitespace a request may spend per pixel value ("255," is 4), plus room for the rest of
# the document: JSON past this for --max-images images is refused before it is parsed, since parsing holds the
# GIL and so stalls every other request meanwhile (binary tensor data costs next to nothing to read)
JSON_BYTES_PER_VALUE = 8
JSON_SLACK_BYTES = 65_536


class V2RequestError(FmtlError):
    """A v2 infer request that cannot be served as sent; ``status`` is its HTTP status (400 unless said)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class V2Request:
    """What an infer request asks for."""

    images: np.ndarray  # uint8 [N, C, H, W]
    id: str | None  # echoed in the answer
    binary_output: bool  # probabilities as raw FP32 bytes after the JSON, not as JSON numbers


def parse_request(
    body: bytes,
    input_shape: tuple[int, int, int],
    header_length: str | None = None,
    content_encoding: str | None = None,
    max_bytes: int = 16_000_000,
    max_images: int | None = None,
) -> V2Request:
    """Read an infer request body.

    Args:
        body: the HTTP body as received.
        input_shape: the model's (C, H, W); the tensor must be [N, C, H, W].
        header_length: the Inference-Header-Content-Length header, if sent (binary tensor data follows the JSON).
        content_encoding: the Content-Encoding header, if sent (gzip and deflate are read, up to ``max_bytes``).
        max_bytes: the most bytes a compressed body may expand to.
        max_images: the most images a request may hold; bounds the JSON part's size (JSON_BYTES_PER_VALUE).

    Raises:
        V2RequestError: anything that is not a well-formed request for this model.
    """
    body = _decompress(body, content_encoding, max_bytes)
    json_length = _json_length(header_length, len(body))
    json_part = body[:json_length]
    if max_images is not None:
        _check_json_size(json_part, max_images, input_shape)
    document = _load_json(json_part, binary_follows=header_length is not None)
    if not isinstance(document, dict):
        raise V2RequestError(f'expected a JSON object {{"inputs": [...]}}, got {_kind(document)}')
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2RequestError(f"id must be a string, got {_kind(request_id)}")
    if request_id is not None and not _is_unicode(request_id):
        raise V2RequestError("id must be Unicode text (it has an unpaired surrogate, which no client could read back)")
    images = _input_tensor(document.get("inputs"), input_shape, body[json_length:], header_length is not None)
    return V2Request(images, request_id, _binary_output(document))


def encode_response(probs: np.ndarray, model_name: str, request: V2Request) -> tuple[bytes, dict[str, str]]:
    """The answer's body and headers (Content-Type included): ``probs`` [N, classes] as JSON or binary FP32."""
    output = {"name": ONNX_OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
    raw = b""
    if request.binary_output:
        raw = np.ascontiguousarray(probs, dtype="<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = probs.astype(np.float32).ravel().tolist()
    answer = {"model_name": model_name, "model_version": "1", "outputs": [output]}
    if request.id is not None:
        answer["id"] = request.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not request.binary_output:
        return header, {"Content-Type": JSON_TYPE}
    return header + raw, {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}


# --- the parts of a request ------------------------------------------------------------------------


def _decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body without its Content-Encoding, refused (413) past ``max_bytes`` instead of expanding a bomb."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _ZLIB_WINDOW:
        raise V2RequestError(f"unsupported Content-Encoding {encoding!r} (gzip, deflate or none)", status=415)
    inflater = zlib.decompressobj(_ZLIB_WINDOW[encoding])
    try:
        plain = inflater.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise V2RequestError(f"bad {encoding} body: {error}") from None
    if len(plain) > max_bytes:
        raise V2RequestError(f"the {encoding} body expands past the limit of {max_bytes / 1e6:g} MB", status=413)
    if not inflater.eof:
        raise V2RequestError(f"bad {encoding} body: truncated")
    return plain


def _json_length(header: str | None, body_length: int) -> int:
    """How many leading bytes of the body are JSON: all of them, or what Inference-Header-Content-Length says."""
    if header is None:
        return body_length
    text = header.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) == 0:
        raise V2RequestError(f"{HEADER_LENGTH} must be a positive whole number, got {header[:40]!r}")
    if int(text) > body_length:
        raise V2RequestError(f"{HEADER_LENGTH} is {text} but the body has only {body_length} bytes")
    return int(text)


def _check_json_size(text: bytes, max_images: int, input_shape: tuple[int, int, int]) -> None:
    """Refuse (413) JSON longer than ``max_images`` images could need, before spending CPU and the GIL on it.
    Whitespace does not count (pretty-printed requests are fine; skipping it costs the parser little)."""
    limit = max_images * math.prod(input_shape) * JSON_BYTES_PER_VALUE + JSON_SLACK_BYTES
    if len(text) <= limit:
        return
    dense = len(text) - sum(text.count(space) for space in (b" ", b"\n", b"\r", b"\t"))
    if dense > limit:
        raise V2RequestError(
            f"{dense / 1e6:.1f} MB of JSON is more than {max_images} images of {list(input_shape)} need "
            f"(limit {limit / 1e6:.1f} MB): send fewer images, or the tensor as binary data", status=413
        )  # fmt: skip


def _load_json(data: bytes, binary_follows: bool) -> object:
    """The parsed JSON header; bad JSON, nesting too deep for the parser and binary bytes are all 400s."""
    hint = "" if binary_follows else f" (binary tensor data needs the {HEADER_LENGTH} header giving the JSON length)"
    try:
        return json.loads(data)
    except UnicodeDecodeError as error:
        raise V2RequestError(f"bad JSON: not UTF-8 text ({error.reason} at byte {error.start}){hint}") from None
    except json.JSONDecodeError as error:
        extra = hint if error.msg == "Extra data" else ""
        raise V2RequestError(f"bad JSON: {error}{extra}") from None
    except RecursionError:
        raise V2RequestError("bad JSON: nested too deeply") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise V2RequestError(f"bad JSON: {error}") from None


def _input_tensor(inputs: object, input_shape: tuple[int, int, int], binary: bytes, has_header: bool) -> np.ndarray:
    """The uint8 batch of the request's one input, from its JSON ``data`` or from the binary part."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise V2RequestError(f'expected "inputs": [one tensor {ONNX_INPUT!r}], got {_kind(inputs)}')
    tensor = inputs[0]
    name = tensor.get("name", ONNX_INPUT)
    if name != ONNX_INPUT:
        raise V2RequestError(f"unknown input {_short(name)}: this model takes one input, {ONNX_INPUT!r}")
    if tensor.get("datatype") != "UINT8":
        raise V2RequestError(f"input datatype must be UINT8, got {_short(tensor.get('datatype'))}")
    shape = _shape(tensor.get("shape"), input_shape)
    parameters = tensor.get("parameters", {})
    if not isinstance(parameters, dict):
        raise V2RequestError(f"input parameters must be an object, got {_kind(parameters)}")
    if "binary_data_size" in parameters:
        if not has_header:
            raise V2RequestError(f"input has binary_data_size but the request has no {HEADER_LENGTH} header")
        if "data" in tensor:
            raise V2RequestError("input has both data and binary_data_size: send one")
        return _binary_tensor(parameters["binary_data_size"], binary, shape)
    if binary:
        raise V2RequestError(f"{len(binary)} bytes after the JSON header, but no input declares binary_data_size")
    return _json_tensor(tensor.get("data"), shape)


def _shape(shape: object, input_shape: tuple[int, int, int]) -> list[int]:
    expected = f"[N, {', '.join(map(str, input_shape))}]"
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int for d in shape)):
        raise V2RequestError(f"input shape must be {expected}, got {_short(shape)}")
    if tuple(shape[1:]) != tuple(input_shape):
        raise V2RequestError(f"input shape must be {expected}, got {shape}")
    if shape[0] < 1:
        raise V2RequestError(f"input shape {shape}: the batch needs at least one image")
    return shape


def _binary_tensor(size: object, binary: bytes, shape: list[int]) -> np.ndarray:
    expected = math.prod(shape)
    if type(size) is not int or size < 0:
        raise V2RequestError(f"binary_data_size must be a whole number of bytes, got {_short(size)}")
    if size != expected:
        raise V2RequestError(f"binary_data_size is {size} but a UINT8 tensor of shape {shape} has {expected} bytes")
    if len(binary) != size:
        raise V2RequestError(f"{len(binary)} bytes after the JSON header, but binary_data_size says {size}")
    return np.frombuffer(binary, dtype=np.uint8).reshape(shape)


def _json_tensor(data: object, shape: list[int]) -> np.ndarray:
    expected = math.prod(shape)
    if not isinstance(data, list):
        raise V2RequestError(f"input data must be a list of {expected} integers, got {_kind(data)}")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged, too deep, or not numbers
        raise V2RequestError("input data is not a regular array of integers") from None
    if array.size != expected or array.dtype.kind not in "iu":
        raise V2RequestError(f"input data must be {expected} integers, got {array.size} of type {array.dtype}")
    if array.min() < 0 or array.max() > 255:
        raise V2RequestError("UINT8 data must lie in 0..255")
    return array.astype(np.uint8).reshape(shape)


def _binary_output(document: dict) -> bool:
    """Whether to answer in binary: the request's binary_data_output, overridden by the output's binary_data."""
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise V2RequestError(f"request parameters must be an object, got {_kind(parameters)}")
    binary = _flag(parameters, "binary_data_output")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise V2RequestError(f"outputs must be a list, got {_kind(outputs)}")
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != ONNX_OUTPUT:
            found = _short(output.get("name")) if isinstance(output, dict) else _kind(output)
            raise V2RequestError(f"unknown output {found}: this model has one output, {ONNX_OUTPUT!r}")
        wanted = output.get("parameters", {})
        if not isinstance(wanted, dict):
            raise V2RequestError(f"output parameters must be an object, got {_kind(wanted)}")
        if wanted.get("classification"):
            raise V2RequestError("the classification extension is not supported: ask for probs and take the top k")
        binary = _flag(wanted, "binary_data", binary)
    return binary


def _flag(parameters: dict, name: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if type(value) is not bool:
        raise V2RequestError(f"{name} must be true or false, got {_short(value)}")
    return value


def _is_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (JSON's escapes can smuggle in a lone surrogate, which does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: object) -> str:
    """A JSON value's type in a message, without echoing a hostile payload."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return names.get(type(value), "a number")


def _short(value: object) -> str:
    """A value in a message, cut to a readable length."""
    text = repr(value) if isinstance(value, str | int | float | bool | type(None)) else _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."
