"""Finding image files: files, folders and glob patterns expanded the way ``fmtl infer`` and training see them.

Torch-free and decoding-free (decoding is fmtl.runtime.images): names are matched by
extension, hidden files and folders are skipped, symlinked folders are followed with each
real folder entered once, so loops end.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

# lower case, without the dot (compare with path.suffix.lower().lstrip(".")); any case matches
IMAGE_EXTENSIONS: frozenset[str] = frozenset({"png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp"})


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in one of IMAGE_EXTENSIONS, in any case."""
    return Path(path).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def collect_image_paths(inputs: Iterable[str], recursive: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of image files.

    - A file named explicitly is kept whatever its extension (decoding will say if it is
      not an image): the user asked for it.
    - A folder contributes its image files (by extension, any case): direct children, or
      the whole tree when ``recursive``. Symlinked folders are followed, each real folder
      once, so symlink loops end. Hidden files and folders (".name") are skipped, as the
      shell and glob skip them (this also skips macOS "._photo.jpg" resource forks).
    - A glob pattern (``*``, ``?``, ``[...]``; ``**`` matches any depth) contributes the
      image files it matches; folders it matches are expanded like folder arguments.

    Returns (paths, problems): problems holds (input, reason) for each input that does not
    exist or yields no image. Paths reached twice (also through symlinks) appear once.
    """
    found: dict[str, Path] = {}  # realpath -> first (smallest) path as the user will see it
    problems: list[tuple[str, str]] = []
    for item in inputs:
        matches, reason = _expand(item, recursive)
        if reason:
            problems.append((item, reason))
        for path in matches:
            key = os.path.realpath(path)
            if key not in found or str(path) < str(found[key]):
                found[key] = path
    return sorted(found.values(), key=str), problems


def _expand(item: str, recursive: bool) -> tuple[list[Path], str | None]:
    """One input -> (image paths, reason it gave nothing or None)."""
    path = Path(item)
    if path.is_dir():
        images = list(folder_images(path, recursive))
        return images, None if images else "no images in folder"
    if path.exists() or path.is_symlink():
        return ([path], None) if path.exists() else ([], "broken symlink")
    if not _has_magic(item):
        return [], "no such file or folder"
    images: list[Path] = []
    for match in _glob(item):
        if match.is_dir():
            images.extend(folder_images(match, recursive))
        elif is_image_path(match) and match.is_file():
            images.append(match)
    return images, None if images else "no images match this pattern"


def _has_magic(text: str) -> bool:
    return any(char in text for char in "*?[")


def folder_images(folder: Path, recursive: bool) -> Iterator[Path]:
    """The image files in ``folder`` (and below it when ``recursive``), as inference and training see them:
    hidden files and folders (``.x``, macOS ``._x.jpg`` forks) skipped, symlink loops entered once."""
    for parent, files in _walk(folder, recursive):
        for name in files:
            if is_image_path(name):
                yield parent / name


def _walk(root: Path, recursive: bool) -> Iterator[tuple[Path, list[str]]]:
    """(folder, visible file names) for ``root`` and, when recursive, every folder below it,
    following symlinked folders but entering each real folder only once (loops end)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # prune in place: os.walk then never descends into these
        dirnames[:] = sorted(d for d in dirnames if recursive and not d.startswith("."))
        yield Path(dirpath), sorted(f for f in filenames if not f.startswith("."))


def _glob(pattern: str) -> list[Path]:
    """glob.glob, except that ``**`` walks with _walk, which ends on symlink loops
    (Python 3.11's glob follows them until the path grows too long)."""
    if "**" not in pattern:
        return [Path(p) for p in glob.glob(pattern)]
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    rest = parts[fixed:]
    matches = []
    for parent, files in _walk(root, recursive=True):
        relative = parent.relative_to(root).parts
        matches.extend(parent / name for name in files if _match_parts(rest, (*relative, name)))
    return matches


def _match_parts(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Match path components against pattern components, where "**" spans zero or more of them."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])
