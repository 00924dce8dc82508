"""fmtl.runtime.images on real files: every PIL mode, EXIF, broken files, bombs, and path collection."""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmtl.runtime.images import (
    DecodeError,
    collect_image_paths,
    decode_bytes,
    decode_image,
    decode_many,
    is_image_path,
    iter_decoded,
    to_uint8,
)

W, H = 10, 7  # deliberately not square: (H, W) vs (width, height) mix-ups fail


def _gradient(mode_max: int = 255, dtype=np.uint8) -> np.ndarray:
    return (np.arange(H * W).reshape(H, W) * mode_max // (H * W - 1)).astype(dtype)


def _mode_image(mode: str) -> Image.Image:
    """A W x H image in ``mode`` with varied pixel values."""
    grey = Image.fromarray(_gradient())
    if mode == "I;16":
        return Image.fromarray(_gradient(65535, np.uint16))
    if mode == "I":
        return Image.fromarray(_gradient(4000, np.int32))
    if mode == "F":
        return Image.fromarray(_gradient(255, np.float32) / 255)
    if mode == "P":
        return Image.merge("RGB", [grey] * 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode in ("LA", "RGBA", "CMYK", "RGB"):
        return Image.merge(mode, [grey] * len(mode))
    return grey.convert(mode)


# mode -> file format that stores it losslessly
MODES = {
    "1": "png",
    "L": "png",
    "LA": "png",
    "P": "png",
    "RGB": "png",
    "RGBA": "png",
    "CMYK": "tiff",
    "I;16": "png",
    "I": "tiff",
    "F": "tiff",
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_decodes_to_channels_and_size(tmp_path: Path, mode: str, channels: int) -> None:
    path = tmp_path / f"img.{MODES[mode]}"
    _mode_image(mode).save(path)
    assert Image.open(path).mode == mode  # the file really holds that mode
    own = decode_image(path, channels, None)
    assert own.dtype == np.uint8 and own.shape == (channels, H, W)
    resized = decode_image(path, channels, (5, 8))
    assert resized.dtype == np.uint8 and resized.shape == (channels, 5, 8)
    assert resized.flags["C_CONTIGUOUS"]


def test_mode_scaling_rules(tmp_path: Path) -> None:
    assert decode_image(Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)), 1, None).tolist() == [
        [[0, 100, 255]]
    ]
    # I with values above 255: min-max scaled
    i_mode = Image.fromarray(np.array([[1000, 3000, 5000]], np.int32))
    assert decode_image(i_mode, 1, None).tolist() == [[[0, 128, 255]]]
    # I within 0..255: kept
    assert decode_image(Image.fromarray(np.array([[3, 200]], np.int32)), 1, None).tolist() == [[[3, 200]]]
    # F within 0..1: fractions of 255
    assert decode_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), 1, None).tolist() == [[[0, 128, 255]]]
    # mode 1: 0 / 255
    assert set(np.unique(decode_image(Image.new("1", (4, 4), 1), 1, None))) == {255}


def test_alpha_is_composited_onto_background(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3] = 0  # transparent
    rgba[0, 1, 3] = 255  # opaque
    rgba[1, :, 3] = 128  # half
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = decode_image(path, 3, None, background=40)
    assert out[:, 0, 0].tolist() == [40] * 3
    assert out[:, 0, 1].tolist() == [200] * 3
    assert abs(int(out[0, 1, 0]) - (200 * 128 + 40 * 127) / 255) <= 1
    grey = decode_image(path, 1, None, background=40)
    assert grey.shape == (1, 2, 2) and grey[0, 0, 0] == 40


def test_palette_transparency_is_composited(tmp_path: Path) -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    path = tmp_path / "p.png"
    image.save(path, transparency=1)
    out = decode_image(path, 3, None, background=9)
    assert out[:, 0, 0].tolist() == [9, 9, 9]
    assert out[:, 0, 1].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("array", "shape"),
    [
        (np.zeros((H, W), np.uint8), (3, H, W)),
        (np.zeros((H, W, 3), np.uint8), (3, H, W)),
        (np.zeros((3, H, W), np.uint8), (3, H, W)),
        (np.zeros((1, H, W), np.float32), (3, H, W)),
        (np.zeros((H, W, 4), np.uint16), (3, H, W)),
        (np.zeros((H, W), bool), (3, H, W)),
    ],
)
def test_arrays_decode(array: np.ndarray, shape: tuple[int, int, int]) -> None:
    out = decode_image(array, 3, None)
    assert out.shape == shape and out.dtype == np.uint8
    assert decode_image(array, 1, (4, 6)).shape == (1, 4, 6)


def test_array_rgb_keeps_channel_order() -> None:
    hwc = np.zeros((5, 6, 3), np.uint8)
    hwc[..., 0] = 255  # pure red
    out = decode_image(hwc, 3, None)
    assert out[0].min() == 255 and out[1].max() == 0 and out[2].max() == 0
    assert np.array_equal(decode_image(out, 3, None), out)  # CHW round trip


def test_to_uint8_handles_odd_values() -> None:
    assert to_uint8(np.array([np.nan, -5.0, 5.0])).tolist() == [128, 0, 255]
    assert to_uint8(np.full((2, 2), -7, np.int64)).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(DecodeError):
        decode_image(np.zeros((5, 5, 9)), 1, None)


def _pattern(width: int, height: int) -> Image.Image:
    """Coarse random blocks: survive JPEG and resizing well enough to compare."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (height // 20, width // 20, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((20, 20, 1), np.uint8)))


@pytest.mark.parametrize(
    ("orientation", "transpose"), [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)]
)
def test_exif_orientation_png_is_exact(tmp_path: Path, orientation: int, transpose: Image.Transpose) -> None:
    image = _pattern(80, 40)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.png"
    image.save(path, exif=exif)
    out = decode_image(path, 3, None)
    expected = np.asarray(image.transpose(transpose)).transpose(2, 0, 1)
    assert out.shape == (3, 80, 40)
    assert np.array_equal(out, expected)


def test_exif_orientation_jpeg_with_draft(tmp_path: Path) -> None:
    """A big JPEG with Orientation=6, decoded small (DCT draft scaling), matches the hand-rotated pixels."""
    image = _pattern(640, 320)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif, quality=95)
    size = (64, 32)  # (H, W) of the upright (portrait) image
    out = decode_image(path, 3, size)
    with Image.open(path) as stored:
        upright = np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270))  # full decode
    expected = decode_image(upright, 3, size)  # an array: no EXIF to apply
    assert out.shape == expected.shape == (3, 64, 32)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 4


def test_exif_rotated_grey_jpeg_channels_1(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "g.JPG"
    _pattern(100, 60).convert("L").save(path, exif=exif)
    assert decode_image(path, 1, None).shape == (1, 100, 60)


def _png_claiming(tmp_path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR is patched (CRC fixed) to claim width x height."""
    path = tmp_path / f"bomb_{width}x{height}.png"
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8)+len(4)+type(4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [9_000, 10_000, 100_000])  # under, in and over PIL's warning range
def test_decompression_bomb_is_refused_fast(tmp_path: Path, side: int) -> None:
    path = _png_claiming(tmp_path, side, side)
    start = time.perf_counter()
    with pytest.raises(DecodeError, match=r"image too large: .*pixels"):
        decode_image(path, 1, (28, 28))
    assert time.perf_counter() - start < 1.0


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("L", (10, 10)).save(path)
    with pytest.raises(DecodeError, match="image too large: 10x10 = 100 pixels"):
        decode_image(path, 1, None, max_pixels=99)
    assert decode_image(path, 1, None, max_pixels=100).shape == (1, 10, 10)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_file(tmp_path: Path, ext: str) -> None:
    full = tmp_path / f"full.{ext}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / f"cut.{ext}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="truncated image"):
        decode_image(cut, 3, (28, 28))


def test_broken_files_give_reasons(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all\n")
    (tmp_path / "folder.png").mkdir()
    cases = {
        "empty.png": "empty file",
        "text.png": r"not an image \(cannot identify\)",
        "folder.png": "is a directory",
        "missing.png": "file not found",
    }
    for name, reason in cases.items():
        with pytest.raises(DecodeError, match=reason):
            decode_image(tmp_path / name, 1, (28, 28))


def test_tiny_and_very_wide_images(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    Image.fromarray(np.full((3, 5000), 77, np.uint8)).save(tmp_path / "wide.png")
    one = decode_image(tmp_path / "one.png", 3, (28, 28))
    assert one.shape == (3, 28, 28) and one[:, 5, 5].tolist() == [10, 20, 30]
    wide = decode_image(tmp_path / "wide.png", 1, (28, 28))
    assert wide.shape == (1, 28, 28) and int(wide.min()) == int(wide.max()) == 77
    assert decode_image(tmp_path / "wide.png", 1, None).shape == (1, 3, 5000)


def test_decode_many_keeps_order_and_errors(tmp_path: Path) -> None:
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (3 + i, 4), i * 30).save(paths[-1])
    (tmp_path / "bad.png").write_text("x")
    paths.insert(3, tmp_path / "bad.png")
    out = decode_many(paths, 1, (2, 2), threads=3)
    assert isinstance(out[3], DecodeError)
    good = [o for o in out if not isinstance(o, DecodeError)]
    assert [int(o[0, 0, 0]) for o in good] == [i * 30 for i in range(7)]
    batches = list(iter_decoded(paths, 1, (2, 2), batch_size=3, threads=2))
    assert [len(b) for b in batches] == [3, 3, 2]
    assert list(iter_decoded([], 1, (2, 2))) == []


# --- collect_image_paths -------------------------------------------------------------------------


def _touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (2, 2)).save(path, format="PNG")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{a.png, B.JPG, notes.txt, .hidden.png, sub/{c.png, deeper/d.webp}, sub/loop -> root}"""
    root = tmp_path / "root"
    for name in ("a.png", "B.JPG", ".hidden.png", "sub/c.png", "sub/deeper/d.webp"):
        _touch_image(root / name)
    (root / "notes.txt").write_text("hello")
    os.symlink(root, root / "sub" / "loop")  # a symlink loop
    return root


def _names(paths: list[Path], root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in paths]


def test_folder_direct_children_only(tree: Path) -> None:
    paths, problems = collect_image_paths([str(tree)], recursive=False)
    assert _names(paths, tree) == ["B.JPG", "a.png"] and problems == []


def test_folder_recursive_survives_symlink_loop(tree: Path) -> None:
    start = time.perf_counter()
    paths, problems = collect_image_paths([str(tree)], recursive=True)
    assert _names(paths, tree) == ["B.JPG", "a.png", "sub/c.png", "sub/deeper/d.webp"]
    assert problems == [] and time.perf_counter() - start < 2


def test_globs_files_and_missing(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    paths, problems = collect_image_paths(
        ["*.JPG", "**/*.png", "notes.txt", "a.png", "nothing*.png", "gone.png"], False
    )
    # notes.txt is named explicitly, so it is kept (decoding will report it); a.png only once
    assert [str(p) for p in paths] == ["B.JPG", "a.png", "notes.txt", "sub/c.png"]
    assert problems == [
        ("nothing*.png", "no images match this pattern"),
        ("gone.png", "no such file or folder"),
    ]


def test_glob_matching_folders_and_empty_folder(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    paths, problems = collect_image_paths([str(tree / "su*"), str(tmp_path / "empty")], recursive=False)
    assert _names(paths, tree) == ["sub/c.png"]
    assert problems == [(str(tmp_path / "empty"), "no images in folder")]


def test_same_file_twice_is_listed_once(tree: Path) -> None:
    paths, _ = collect_image_paths([str(tree / "a.png"), str(tree), str(tree / "sub" / "loop" / "a.png")], False)
    assert _names(paths, tree) == ["B.JPG", "a.png"]


def test_is_image_path_any_case() -> None:
    assert is_image_path("x.JPEG") and is_image_path("a/b.TiF") and is_image_path("c.webp")
    assert not is_image_path("d.txt") and not is_image_path("png")


# --- bounded work per image: format allowlist, high-bit-depth cost ------------------------------------

_MEASURE = """
import json, resource, sys, time
from fmtl.runtime.images import DecodeError, decode_bytes
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    shape, error = list(decode_bytes(data, 1, (28, 28)).shape), None
except DecodeError as exc:
    shape, error = None, str(exc)
seconds = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"shape": shape, "error": error, "seconds": seconds, "mib": grown}))
"""


def _decode_in_subprocess(path: Path) -> dict:
    """Decode ``path`` with decode_bytes in a fresh interpreter; its peak-RSS growth (MiB) and time."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_huge_float_tiff_is_refused_cheaply(tmp_path: Path) -> None:
    """An 8000x8000 32-bit float TIFF (a few hundred KB compressed, 256 MB decoded) costs nothing to refuse."""
    path = tmp_path / "float.tif"
    Image.new("F", (8000, 8000), 0.5).save(path, compression="tiff_adobe_deflate")
    assert path.stat().st_size < 1_000_000
    result = _decode_in_subprocess(path)
    assert result["error"] == (
        "image too large: 8000x8000 = 64000000 pixels counted x4 for 32-bit F (limit 64000000 pixels)"
    )
    assert result["mib"] <= 256 and result["seconds"] <= 1.0, result


def test_float_tiff_converts_without_whole_float64_copies(tmp_path: Path) -> None:
    """A 4000x4000 float TIFF (64 MB decoded) costs about its decoded buffer plus its uint8 copy, not the
    float64 copies (128 MB each) of converting the whole image at once."""
    rng = np.random.default_rng(0)
    values = rng.random((4000, 4000), dtype=np.float32) * 1000 - 3  # min-max scaled
    values[0, 0] = np.nan
    path = tmp_path / "float.tif"
    Image.fromarray(values, "F").save(path, compression="tiff_adobe_deflate")
    result = _decode_in_subprocess(path)
    assert result["shape"] == [1, 28, 28], result
    assert result["mib"] <= 128, result


def test_block_conversion_matches_whole_array_rules() -> None:
    """Converting in blocks keeps the rules that need the whole image's range (min-max, NaN as 0)."""
    big = np.linspace(-10, 500, 3000 * 700, dtype=np.float32).reshape(3000, 700)
    big[1, 1] = np.nan
    expected = np.clip(np.rint((np.nan_to_num(big.astype(np.float64)) + 10) * (255 / 510)), 0, 255)
    assert np.array_equal(to_uint8(big), expected.astype(np.uint8))
    image = Image.fromarray(big, "F")
    assert np.array_equal(decode_image(image, 1, None)[0], expected.astype(np.uint8))


def test_big_endian_16_bit_is_divided_not_stretched() -> None:
    assert to_uint8(np.array([257 * 10, 257 * 20], dtype=">u2")).tolist() == [10, 20]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("eps.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"),
        ("ppm.png", b"P5 4 4 255\n" + bytes(range(16))),
    ],
)
def test_formats_outside_the_allowlist_are_refused(tmp_path: Path, name: str, data: bytes) -> None:
    """PIL identifies these (EPS would run Ghostscript to load); fmtl refuses them as not images."""
    path = tmp_path / name
    path.write_bytes(data)
    with Image.open(path) as image:
        assert image.format in ("EPS", "PPM")
    with pytest.raises(DecodeError, match=r"not an image \(cannot identify\)"):
        decode_image(path, 1, (28, 28))
    with pytest.raises(DecodeError, match=r"not an image \(cannot identify\)"):
        decode_bytes(data, 1, (28, 28))


def test_high_bit_depth_pixels_count_by_their_size(tmp_path: Path) -> None:
    """16-bit pixels count 2 and 32-bit ones 4 against max_pixels, from a file or a PIL image alike."""
    floats = Image.fromarray(np.full((20, 20), 0.5, np.float32))  # 400 pixels, 1600 counted
    sixteen = Image.fromarray(np.full((20, 20), 300, np.uint16))  # 800 counted
    floats.save(tmp_path / "f.tif")
    sixteen.save(tmp_path / "i16.png")
    for source in (floats, tmp_path / "f.tif"):
        with pytest.raises(DecodeError, match=r"400 pixels counted x4 for 32-bit F \(limit 1599 pixels\)"):
            decode_image(source, 1, (8, 8), max_pixels=1599)
        assert decode_image(source, 1, (8, 8), max_pixels=1600).shape == (1, 8, 8)
    with pytest.raises(DecodeError, match=r"counted x2 for 16-bit I;16"):
        decode_image(tmp_path / "i16.png", 1, (8, 8), max_pixels=799)
    assert decode_image(tmp_path / "i16.png", 1, (8, 8), max_pixels=800).shape == (1, 8, 8)
