"""Torch-free image decoding for real folders: any file, any PIL mode, to uint8 [C, H, W].

One function, ``decode_image``, turns a path, a PIL image or a numpy array into exactly
what an fmtl model is fed: uint8, ``channels`` planes (1 grey, 3 RGB), resized to the
source size. How it gets there, for every input:

1. Files: empty, missing, non-regular and unidentifiable files, files in any format but
   ``ALLOWED_FORMATS`` (PNG, JPEG, WebP, BMP, GIF, TIFF: never EPS/PS, whose plugin runs
   Ghostscript), and images above ``max_pixels`` (default 64 megapixels) are rejected with
   a ``DecodeError`` *before* any pixel is decoded (PIL reads only the header in
   ``Image.open``), so a decompression bomb costs nothing. 16- and 32-bit images count 2
   and 4 pixels per pixel against the limit, as their decoded buffers are that much
   bigger. PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS, about 179 M) still applies
   above that and is reported the same way.
   JPEGs much bigger than needed are decoded at a reduced DCT scale (``draft``, to at
   least twice the target size), several times faster on photos for a fraction of a grey
   level of difference.
2. EXIF orientation is applied (``ImageOps.exif_transpose``), as every photo viewer does.
3. Modes are brought to 8 bits, then alpha is composited onto the ``background`` grey:
     1 -> L (0/255); P -> RGB, or RGBA when it has a transparent colour; L/RGB with a
     transparent colour (tRNS) -> RGBA; LA/PA/RGBA/La/RGBa -> composited; CMYK, YCbCr,
     LAB, HSV, RGBX -> RGB (PIL's conversion); 16-bit and 32-bit modes -> L by
     ``to_uint8`` (I;16: divide by 257, so 65535 -> 255; I and F: see ``to_uint8``).
   Numpy arrays follow the same rules by dtype (uint16 like I;16, bool -> 0/255).
4. Grey and colour are then converted to ``channels``: RGB -> L with PIL's ITU-R 601-2
   luma, L -> RGB by repetition.
5. Resize to ``size`` = (height, width) with PIL's bilinear filter, which widens its
   support when shrinking (antialiased, as torchvision's ``antialias=True``).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
import stat
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from fmtl.errors import FmtlError, one_line
from fmtl.runtime.image_files import IMAGE_EXTENSIONS, collect_image_paths, folder_images, is_image_path

# Finding image files lives in fmtl.runtime.image_files; its names stay importable from here.
__all__ = ["ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "DecodeError", "Source", "collect_image_paths",
           "decode_bytes", "decode_image", "decode_many", "decode_or_error", "default_threads", "folder_images",
           "is_image_path", "iter_decoded", "to_uint8"]  # fmt: skip

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: bigger than any phone photo, far below a bomb's size
# The formats Image.open may identify (PIL's format names); anything else is "not an image".
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

Source = str | os.PathLike | bytes | Image.Image | np.ndarray  # bytes: an encoded file held in memory

# Image.open warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS (89 M) and raises
# DecompressionBombError above twice that. fmtl checks its own ``max_pixels`` right after
# the header is read, so PIL's warning is silenced while opening (its error still counts).
# Warnings filters are process-global, so openings are serialised; Image.open reads only
# the header, so the lock is held for microseconds and decoding stays parallel.
_OPEN_LOCK = threading.Lock()
_ORIENTATION = ExifTags.Base.Orientation


class DecodeError(FmtlError):
    """An image that cannot be decoded; ``str(error)`` is a short human reason."""


def decode_image(
    source: Source,
    channels: int,
    size: tuple[int, int] | None,
    background: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: str = "stretch",
) -> np.ndarray:
    """Decode one image to a uint8 array [channels, H, W].

    Args:
        source: a file path, an encoded file's bytes, a PIL image, or a numpy array (HW, HWC or CHW; any
            real dtype).
        channels: 1 for grey, 3 for RGB.
        size: (height, width) to resize to, or None to keep the image's own size.
        background: grey level (0..255) that transparent pixels are composited onto.
        max_pixels: images with more pixels than this are refused before decoding.
        fit: ``stretch`` or ``crop``: how an image of another aspect reaches ``size`` (see ``_finish``).

    Raises:
        DecodeError: the source is not a decodable image (the message says why).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if isinstance(source, np.ndarray):
        return _finish(_array_to_pil(source, max_pixels), channels, size, background, fit)
    if isinstance(source, bytes):
        return decode_bytes(source, channels, size, background, max_pixels, fit)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, source.mode)
        return _finish(source, channels, size, background, fit)
    return _decode_file(Path(source), channels, size, background, max_pixels, fit)


def decode_bytes(
    data: bytes,
    channels: int,
    size: tuple[int, int] | None,
    background: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: str = "stretch",
) -> np.ndarray:
    """Decode an encoded image held in memory (an HTTP upload) with the same checks and rules as a file.

    Raises:
        DecodeError: the bytes are not a decodable image (the message says why).
    """
    if not data:
        raise DecodeError("empty file")
    return _decode_file(io.BytesIO(data), channels, size, background, max_pixels, fit)


def _decode_file(
    path: Path | io.BytesIO, channels: int, size: tuple[int, int] | None, background: int, max_pixels: int,
    fit: str = "stretch",
) -> np.ndarray:  # fmt: skip
    """Open, check and decode one file, turning every failure into a DecodeError with a reason."""
    try:
        if isinstance(path, Path):  # in-memory data (decode_bytes) has no file to check
            info = os.stat(path)
            if stat.S_ISDIR(info.st_mode):
                raise DecodeError("is a directory")
            if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
                raise DecodeError("not a regular file")
            if info.st_size == 0:
                raise DecodeError("empty file")
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=ALLOWED_FORMATS)
        with image:
            _check_pixels(image.size, max_pixels, image.mode)
            if size is not None and image.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with extra frames
                image.draft(None, _draft_size(image, size))
            image.load()  # decode now, so truncation surfaces here and not inside getexif or convert
            return _finish(image, channels, size, background, fit)
    except DecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise DecodeError(f"image too large: {_bomb_pixels(error)}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (cannot identify)") from None  # or a format outside ALLOWED_FORMATS
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as error:
        if "truncated" in str(error).lower():
            raise DecodeError("truncated image") from None
        raise DecodeError(f"unreadable image ({one_line(error)})") from None
    except Exception as error:  # corrupt files raise anything from a plugin: never crash a folder run
        raise DecodeError(f"corrupt image ({type(error).__name__}: {one_line(error)})") from None


def _check_pixels(wh: tuple[int, int], max_pixels: int, mode: str = "L") -> None:
    """Refuse images over ``max_pixels``, a 16-bit pixel counting 2 and a 32-bit one 4 (their cost)."""
    width, height = wh
    weight = _bytes_per_sample(mode)
    if width * height * weight > max_pixels:
        counted = f" counted x{weight} for {8 * weight}-bit {mode}" if weight > 1 else ""
        raise DecodeError(
            f"image too large: {width}x{height} = {width * height} pixels{counted} (limit {max_pixels} pixels)"
        )
    if width * height == 0:
        raise DecodeError("empty image (0 pixels)")


def _bytes_per_sample(mode: str) -> int:
    """1 for 8-bit modes, 2 for I;16*, 4 for I and F."""
    if mode.startswith("I;16"):
        return 2
    return 4 if mode in ("I", "F") else 1


def _bomb_pixels(error: Exception) -> str:
    """PIL's bomb message names the pixel count; keep that and say whose limit it was."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    count = found.group(1) if found else "too many"
    return f"{count} pixels (over PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS)"


def _draft_size(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) a JPEG may be DCT-scaled down to, in stored (pre-EXIF-rotation) orientation.

    Twice the target: the bilinear resize then does the last 2x or more. Measured on a
    3600x3072 photo: 6-7x faster than a full decode, mean difference 0.1-0.2 grey levels
    (0.5 when drafting to the target size itself) at 28, 64 and 224 px."""
    height, width = 2 * size[0], 2 * size[1]
    if _orientation(image) in (5, 6, 7, 8):  # these orientations swap width and height
        height, width = width, height
    return width, height


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except Exception:  # broken EXIF: treat as upright rather than reject the pixels
        return 1


def _finish(
    image: Image.Image, channels: int, size: tuple[int, int] | None, background: int, fit: str = "stretch"
) -> np.ndarray:
    """EXIF-rotate, convert the mode, composite alpha, resize; return uint8 [C, H, W].

    ``fit``: ``stretch`` resizes to ``size`` whatever the aspect (models trained before fmtl recorded a
    policy); ``crop`` resizes the shorter side to fit and cuts the centre out, as photos are usually brought
    to a square."""
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    image = _flatten(_to_8bit(image), background)
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size[1], size[0]) and fit == "crop":
        image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BILINEAR)
    elif size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)  # PIL sizes are (width, height)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return np.ascontiguousarray(array[None])
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _to_8bit(image: Image.Image) -> Image.Image:
    """Any PIL mode -> one of L, LA, RGB, RGBA (8 bits per channel), keeping transparency."""
    mode = image.mode
    if mode in ("L", "RGB", "P") and "transparency" in image.info:
        return image.convert("RGBA")  # palette or colour-key transparency becomes a real alpha channel
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode in ("1", "P"):
        return image.convert("L" if mode == "1" else "RGB")
    if mode in ("La", "RGBa", "PA"):
        return image.convert("LA" if mode == "La" else "RGBA")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_image_to_uint8(image), "L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _flatten(image: Image.Image, background: int) -> Image.Image:
    """Composite LA/RGBA onto a uniform ``background`` grey: out = c * a + bg * (1 - a)."""
    if image.mode not in ("LA", "RGBA"):
        return image
    base_mode = image.mode[:-1]
    base = Image.new(base_mode, image.size, (background,) * len(base_mode))
    base.paste(image.convert(base_mode), mask=image.getchannel("A"))
    return base


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale any real array to uint8, with the rules fmtl uses for 16-bit, 32-bit and float images.

    - uint8: unchanged; bool: 0/255.
    - uint16 (PIL mode I;16): divide by 257 and round, so the full 0..65535 range maps to 0..255
      exactly as an 8-bit export of the same image would.
    - other integers (mode I) and floats (mode F): floats all within 0..1 are taken as
      fractions and multiplied by 255 (the numpy/matplotlib convention); values already
      within 0..255 are kept (rounded); anything else (negative values, or above 255 as
      12-bit sensors and depth maps give) is min-max scaled to 0..255, because clipping
      would turn most of such an image white. NaN and infinities count as 0.

    The work goes a block of rows at a time, so a large image costs its uint8 result and a
    few MB, never a float64 copy of the whole.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    step = max(1, _BLOCK_ELEMENTS // max(1, array[:1].size))  # rows per block

    def blocks() -> Iterator[np.ndarray]:
        return (array[i : i + step] for i in range(0, len(array), step))  # views, no copy

    out = np.empty(array.shape, dtype=np.uint8)
    for i, block in zip(range(0, len(array), step), _blocks_to_uint8(blocks, array.dtype), strict=True):
        out[i : i + step] = block
    return out


_BLOCK_ELEMENTS = 1 << 20  # values converted at a time: float64 temporaries of 8 MB whatever the image size


def _image_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16/32-bit or float PIL image (I;16*, I, F) -> uint8 [H, W] by ``to_uint8``'s rules, reading the
    image a strip of rows at a time (``np.asarray`` of the whole would copy all of it first)."""
    width, height = image.size
    step = max(1, _BLOCK_ELEMENTS // width)

    def strips() -> Iterator[np.ndarray]:
        return (np.asarray(image.crop((0, y, width, min(height, y + step)))) for y in range(0, height, step))

    dtype = np.asarray(image.crop((0, 0, 1, 1))).dtype
    out = np.empty((height, width), dtype=np.uint8)
    for y, strip in zip(range(0, height, step), _blocks_to_uint8(strips, dtype), strict=True):
        out[y : y + step] = strip
    return out


def _blocks_to_uint8(blocks: Callable[[], Iterator[np.ndarray]], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Each block of an image, as uint8 by ``to_uint8``'s rules. ``blocks()`` yields the image's blocks in
    order; it is called twice for integers and floats: once for the value range, once to convert."""
    if dtype.kind == "u" and dtype.itemsize == 2:
        for block in blocks():
            yield ((block.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return
    if dtype.kind not in "iuf":
        raise DecodeError(f"unsupported array dtype {dtype}")
    low, high = np.inf, -np.inf
    for block in blocks():
        values = _finite(block)
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if low > high:  # no values at all
        low = high = 0.0
    if dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        scale, offset = 255.0, 0.0
    elif low < 0.0 or high > 255.0:
        scale, offset = (255.0 / (high - low) if high > low else 0.0), low
    else:
        scale, offset = 1.0, 0.0
    for block in blocks():
        values = _finite(block)
        values -= offset
        values *= scale
        yield np.clip(np.rint(values, out=values), 0, 255, out=values).astype(np.uint8)


def _finite(block: np.ndarray) -> np.ndarray:
    """A float64 copy of one block with NaN and infinities as 0."""
    return np.nan_to_num(block.astype(np.float64), copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _array_to_pil(array: np.ndarray, max_pixels: int) -> Image.Image:
    """HW, HWC or CHW array of any real dtype -> an 8-bit PIL image (L, LA, RGB or RGBA).

    A 3-D array whose last axis has 1-4 entries is read as HWC, else one whose first
    axis has 1-4 entries as CHW (so [3, 28, 28] is CHW and [28, 28, 3] is HWC).
    """
    if array.ndim == 3 and array.shape[-1] in (1, 2, 3, 4):
        hwc = array
    elif array.ndim == 3 and array.shape[0] in (1, 2, 3, 4):
        hwc = array.transpose(1, 2, 0)
    elif array.ndim == 2:
        hwc = array[:, :, None]
    else:
        raise DecodeError(f"array of shape {tuple(array.shape)} is not an image (HW, HWC or CHW with 1-4 channels)")
    _check_pixels((hwc.shape[1], hwc.shape[0]), max_pixels)
    hwc = np.ascontiguousarray(to_uint8(hwc))
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[hwc.shape[2]]
    return Image.fromarray(hwc[:, :, 0] if mode == "L" else hwc, mode)


# --- many images at once ---------------------------------------------------------------------------


def default_threads() -> int:
    """Decoding threads: one per core, at most 8 (PIL releases the GIL while decoding and resizing)."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_or_error(
    source: Source,
    channels: int,
    size: tuple[int, int] | None,
    background: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: str = "stretch",
) -> np.ndarray | DecodeError:
    """``decode_image``, with a failure returned instead of raised: for batches where one bad image
    must not stop the others."""
    try:
        return decode_image(source, channels, size, background, max_pixels, fit)
    except DecodeError as error:
        return error


def decode_many(
    paths: Sequence[Source],
    channels: int,
    size: tuple[int, int] | None,
    background: int = 0,
    threads: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: str = "stretch",
) -> list[np.ndarray | DecodeError]:
    """Decode every source in a thread pool; results in input order, a DecodeError in place of a failure."""
    results: list[np.ndarray | DecodeError] = []
    batches = iter_decoded(paths, channels, size, background, max(1, len(paths)), threads, max_pixels, fit)
    for batch in batches:
        results.extend(batch)
    return results


def iter_decoded(
    paths: Sequence[Source],
    channels: int,
    size: tuple[int, int] | None,
    background: int = 0,
    batch_size: int = 64,
    threads: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: str = "stretch",
) -> Iterator[list[np.ndarray | DecodeError]]:
    """Yield decoded batches of ``batch_size`` in input order, decoding the next batch while
    the caller works on the current one. Only two batches are in memory at a time, so
    folders of any length are fine."""
    starts = range(0, len(paths), batch_size)
    if not starts:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        pending: deque[list[concurrent.futures.Future]] = deque()
        start_iter = iter(starts)

        def submit_next() -> None:
            start = next(start_iter, None)
            if start is not None:
                chunk = paths[start : start + batch_size]
                args = (channels, size, background, max_pixels, fit)
                pending.append([pool.submit(decode_or_error, path, *args) for path in chunk])

        submit_next()
        submit_next()  # one batch ahead
        while pending:
            futures = pending.popleft()
            submit_next()
            yield [future.result() for future in futures]
