"""Fuzzing image decoding: mutated PNG, JPEG, TIFF, GIF, WebP and BMP bytes.

The property: ``decode_bytes`` on any bytes gives either a uint8 array of exactly the shape
asked for, or a ``DecodeError`` (fmtl's one-line reason), never another exception, within a
time bound per image and a memory bound for the whole run. Hypothesis is seeded
(``derandomize``) and keeps no example database, so every run tries the same inputs; the
suite is sized to take well under a minute.
"""

from __future__ import annotations

import io
import resource
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fmtl.runtime.images import DecodeError, decode_bytes

MAX_PIXELS = 4_000_000  # as a server sized to a small model would pass
SECONDS_PER_IMAGE = 2.0  # generous: a shared CI core; a decode here normally takes milliseconds
MAX_RSS_GROWTH_MIB = 256


def _seed_files() -> dict[str, bytes]:
    """Small valid files, one per format and a few modes each: the material mutations start from."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    seeds = {}
    for name, image, fmt, options in [
        ("png_rgb", rgb, "PNG", {}),
        ("png_rgba", rgb.convert("RGBA"), "PNG", {}),
        ("png_16bit", Image.fromarray(rng.integers(0, 65536, (9, 11), dtype=np.uint16)), "PNG", {}),
        ("png_palette", rgb.convert("P"), "PNG", {"transparency": 3}),
        ("jpeg", rgb, "JPEG", {"quality": 80}),
        ("jpeg_progressive_grey", grey, "JPEG", {"progressive": True}),
        ("tiff_float", Image.fromarray(rng.random((10, 13), dtype=np.float32)), "TIFF", {}),
        ("tiff_deflate", rgb, "TIFF", {"compression": "tiff_adobe_deflate"}),
        ("gif", rgb.convert("P"), "GIF", {}),
        ("webp", rgb, "WEBP", {"quality": 70}),
        ("bmp", grey, "BMP", {}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        seeds[name] = buffer.getvalue()
    return seeds


SEEDS = _seed_files()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file with a few mutations: flipped bytes, 32-bit fields set to extremes (sizes, offsets,
    counts), a cut, an inserted or repeated run."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "int32", "int16", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip":
            data[at : at + 1] = bytes([draw(st.integers(0, 255))])  # a slice: the file may be empty by now
        elif kind in ("int32", "int16"):
            width = 4 if kind == "int32" else 2
            value = draw(st.sampled_from([0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            packed = struct.pack(draw(st.sampled_from([">I", "<I"])), value & 0xFFFFFFFF)[-width:]
            data[at : at + width] = packed
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 256))] * draw(st.integers(2, 8))
    return bytes(data)


@pytest.fixture(scope="module")
def rss_budget():
    """Fails the module's last test if the decoding, all examples together, grew peak RSS too much."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown <= MAX_RSS_GROWTH_MIB, f"peak RSS grew {grown:.0f} MiB while fuzzing"


def _check(data: bytes, channels: int, size: tuple[int, int] | None) -> None:
    start = time.perf_counter()
    try:
        out = decode_bytes(data, channels, size, max_pixels=MAX_PIXELS)
    except DecodeError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[0] == channels
        if size is not None:
            assert out.shape[1:] == size
        assert out.shape[1] * out.shape[2] <= MAX_PIXELS
    assert time.perf_counter() - start < SECONDS_PER_IMAGE


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_files_decode(name: str) -> None:
    """The seeds themselves are valid, so mutations start from files that reach the decoders."""
    assert decode_bytes(SEEDS[name], 3, (28, 28)).shape == (3, 28, 28)


FUZZ = settings(
    derandomize=True,
    database=None,
    max_examples=700,
    deadline=None,  # the time bound is checked per image in _check, with a margin for a loaded machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(data=mutated(), channels=st.sampled_from([1, 3]))
def test_mutated_files_decode_or_give_a_decode_error(rss_budget, data: bytes, channels: int) -> None:
    _check(data, channels, (28, 28))


@FUZZ
@given(data=mutated())
def test_mutated_files_at_their_own_size(rss_budget, data: bytes) -> None:
    """size=None keeps the image's own size: the pixel limit is all that bounds the work."""
    _check(data, 1, None)


@settings(derandomize=True, database=None, max_examples=250, deadline=None)
@given(data=st.binary(max_size=512), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                                                              b"II*\x00", b"MM\x00*", b"GIF89a", b"BM"]))  # fmt: skip
def test_random_bytes_behind_a_magic_number(rss_budget, data: bytes, prefix: bytes) -> None:
    _check(prefix + data, 3, (28, 28))
