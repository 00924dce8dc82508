"""`fmtl infer --engine ray`: classify millions of images on a Ray cluster with Ray Data.

Needs the optional extra (``pip install "fmtl[ray]"``); importing this module without it
raises an InferError that says so, and nothing else in fmtl imports ray.

The pipeline is Ray Data's batch-inference pattern, built on fmtl's own runtime:

    local files: from_items(paths)                    the paths, as bytes (any file name)
    URIs: read_binary_files(files, include_paths=True)   read tasks: bytes + path per file
      -> map_batches(Predictor, ActorPoolStrategy)    actors: one Classifier each, model loaded once
      -> iter_batches in the driver                   part files written atomically into --out

- The driver lists only regular files up to ``max_file_bytes``: anything else (a FIFO named
  ``x.png``, a symlink to ``/dev/zero``, a folder, a huge file) becomes an error row there and
  is never opened, so it can neither hang a read nor fill memory.
- ``Predictor`` decodes with fmtl's decoder (``decode_image``: local files straight from their
  path, with the same checks, format allowlist, EXIF, mode, size and decompression-bomb
  handling as ``fmtl infer``) and classifies through ``fmtl.runtime.results.classify_decoded``,
  the path ``fmtl infer`` uses, with onnxruntime threads matching the actor's CPUs. A file
  that cannot be decoded becomes a row with an ``error``; it never fails the job.
- Paths are written as ``fmtl infer`` writes them: bytes that are not UTF-8 as backslash escapes.
- The driver writes the results (a few hundred bytes per image) as ``part-*.parquet`` or
  ``part-*.jsonl`` files, each complete or absent (fmtl.atomic), in the folder the command
  was run for, whichever node the work ran on. A rerun with the same ``--out`` reads the
  paths already written and classifies only the others, so a killed job can be finished
  (the part files: fmtl.runtime.ray_parts).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmtl.runtime.classifier import Classifier, check_min_probability
from fmtl.runtime.image_files import collect_image_paths, is_image_path
from fmtl.runtime.images import DEFAULT_MAX_PIXELS, decode_many
from fmtl.runtime.infer import Echo, InferError, load_classifier
from fmtl.runtime.results import Row, classify_decoded
from fmtl.runtime.text import shown_name, terminal_text

try:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray
    import ray.data

    from fmtl.runtime.ray_cluster import connect_cluster, start_local_cluster
except ImportError as error:  # the extra is missing: the CLI prints this one line and exits 1
    raise InferError(
        f'--engine ray needs the ray extra: pip install "fmtl[ray]" ({error.name or "ray"} is not installed)'
    ) from None

from fmtl.runtime.ray_parts import (  # noqa: E402 (after the check that the extra is installed)
    FORMATS,
    SCHEMA,
    read_results,
    rows_to_table,
    summarise,
    table_to_rows,
    write_parts,
    written_paths,
)

__all__ = ["FORMATS", "SCHEMA", "ClusterOptions", "Predictor", "build_dataset", "list_inputs", "read_results", "run",
           "rows_to_table", "screen_files", "start_local_cluster", "table_to_rows"]  # fmt: skip

DEFAULT_ROWS_PER_FILE = 10_000  # rows per part file: a killed job loses at most this many finished rows
DEFAULT_MAX_FILE_BYTES = 256 * 2**20  # bigger files are error rows, never read (an 8-bit 64 MP TIFF is 192 MB)


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how wide to run.

    Attributes:
        address: an existing cluster ("auto", "ray://host:10001", "host:6379"); None starts a
            local one for this command and shuts it down afterwards.
        actors: Classifier actors; None: as many as the cluster's CPUs (GPUs) allow, keeping one
            CPU free for reading.
        cpus_per_actor: CPUs each actor reserves; its onnxruntime and decoding threads match it.
        gpus_per_actor: GPUs each actor reserves (onnxruntime then picks CUDA when it has it).
    """

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


# --- the actor ----------------------------------------------------------------------------------------


class Predictor:
    """Ray Data callable class: one Classifier per actor, one table of result rows per batch."""

    def __init__(
        self,
        model: bytes,
        k: int,
        threads: int,
        min_probability: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        """Open ``model`` (the .onnx bytes, shipped with the job so no node needs the file) with ``threads``
        onnxruntime threads; it is written to a private scratch file only for as long as loading takes."""
        with tempfile.TemporaryDirectory(prefix="fmtl-ray-") as scratch:
            model_path = Path(scratch) / "model.onnx"
            model_path.write_bytes(model)
            self.classifier = Classifier(model_path, threads=threads)
        self.k = k
        self.threads = threads
        self.min_probability = min_probability
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """A batch of local paths (bytes: ``path``) or of read files (``path`` and ``bytes``) -> result rows."""
        if "bytes" in batch:
            names = [str(path) for path in batch["path"]]
            sources = [bytes(content) for content in batch["bytes"]]
        else:  # local files, decoded straight from their paths
            names = sources = [os.fsdecode(bytes(path)) for path in batch["path"]]
        spec = self.classifier.spec
        decoded = decode_many(
            sources, spec.channels, spec.source_size, spec.background, self.threads, self.max_pixels, spec.fit
        )
        rows = classify_decoded(self.classifier, names, decoded, self.k, self.min_probability, len(names) or 1)
        return rows_to_table(rows)


# --- the command -------------------------------------------------------------------------------------


def run(
    inputs: Sequence[str],
    model: str | None,
    out: str | None,
    k: int = 5,
    batch_size: int = 64,
    fmt: str = "parquet",
    recursive: bool = False,
    cluster: ClusterOptions | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    progress: bool = True,
    echo_err: Echo | None = None,
    min_probability: float | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> int:
    """Classify every image in ``inputs`` on Ray and write part files into ``out``; return the exit code.

    Args:
        inputs: local files, folders and globs (as ``fmtl infer``), or URIs Ray reads
            (``s3://bucket/prefix``, ``gs://...``, ``file:///...``), all on one filesystem.
        model: an fmtl .onnx file on this machine, or None for the newest one in export/.
        out: the output folder; images whose path is already in it are skipped.
        k, batch_size, recursive: as ``fmtl infer``; batch_size is also Ray's map_batches batch.
        fmt: "parquet" or "jsonl" (fmtl infer's jsonl rows).
        cluster: where and how wide to run (ClusterOptions).
        rows_per_file: rows per part file.
        progress: Ray Data's progress output.
        echo_err: where messages go (stderr by default).
        min_probability: mark rows whose top-1 probability is below it unsure (as ``fmtl infer``).
        max_file_bytes: larger files are error rows, never read.
        max_pixels: images with more pixels are error rows, refused before decoding (as ``fmtl infer``).

    Returns:
        0 when every image is in ``out`` and at least one was classified, else 1.

    Raises:
        InferError: bad options, no usable model, an unreadable ``out``.
    """
    echo_err = echo_err or _print_err
    cluster = cluster or ClusterOptions()
    _check_options(out, k, batch_size, fmt, cluster, rows_per_file)
    try:
        check_min_probability(min_probability)
    except ValueError as error:
        raise InferError(str(error)) from None
    out_dir = Path(out)
    classifier = load_classifier(model, echo_err)
    files, filesystem = list_inputs(inputs, recursive, echo_err)
    done = written_paths(out_dir, fmt)
    todo = [path for path in files if shown_name(path) not in done]
    echo_err(f"{len(files)} images, {len(files) - len(todo)} already in {out_dir}/, {len(todo)} to classify")
    readable, refused = screen_files(todo, filesystem, max_file_bytes)
    tables: Iterable[pa.Table] = [rows_to_table(refused)] if refused else []
    started = bool(readable) and _connect(cluster.address, progress)
    try:
        if readable:
            limits = {"min_probability": min_probability, "max_pixels": max_pixels}
            dataset = build_dataset(readable, filesystem, classifier, k, batch_size, cluster, **limits)
            tables = itertools.chain(tables, _tables(dataset))
        if todo:
            write_parts(tables, out_dir, fmt, rows_per_file, echo_err)
    finally:
        if started:
            ray.shutdown()
    return summarise(out_dir, fmt, {shown_name(path) for path in files}, echo_err)


def _print_err(message: str) -> None:
    print(message, file=sys.stderr)


def _check_options(
    out: str | None, k: int, batch_size: int, fmt: str, cluster: ClusterOptions, rows_per_file: int
) -> None:
    if not out:
        raise InferError("--engine ray writes part files into a folder: give --out DIR")
    if fmt not in FORMATS:
        raise InferError(f"--engine ray writes {' or '.join(FORMATS)}, not {fmt!r}: pass --format parquet|jsonl")
    if k < 1 or batch_size < 1 or rows_per_file < 1:
        raise InferError("-k, --batch-size and --rows-per-file must be at least 1")
    if cluster.actors is not None and cluster.actors < 1:
        raise InferError(f"--actors must be at least 1, got {cluster.actors}")
    if cluster.cpus_per_actor <= 0 or cluster.gpus_per_actor < 0:
        raise InferError("--cpus-per-actor must be above 0 and --gpus-per-actor at least 0")
    if Path(out).exists() and not Path(out).is_dir():
        raise InferError(f"--out {out} is a file: give a folder")


# --- inputs and outputs -------------------------------------------------------------------------------


def list_inputs(inputs: Sequence[str], recursive: bool, echo_err: Echo) -> tuple[list[str], pafs.FileSystem | None]:
    """The image files to read, as Ray will name them, and their filesystem (None: local).

    Local inputs are expanded exactly as ``fmtl infer`` expands them, then made absolute, so
    the workers of any node find them (on a filesystem every node mounts). URIs are listed
    with pyarrow's filesystem for their scheme; Ray names those files without the scheme.
    """
    uris = [item for item in inputs if "://" in item]
    if uris and len(uris) != len(inputs):
        raise InferError("give either local paths or URIs (s3://...), not both, in one run")
    if not uris:
        paths, problems = collect_image_paths(inputs, recursive)
        for item, reason in problems:
            echo_err(f"warning: {terminal_text(item)}: {reason}")
        return [os.path.abspath(path) for path in paths], None
    filesystem: pafs.FileSystem | None = None
    files: list[str] = []
    for uri in uris:
        try:
            uri_fs, root = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as error:  # an unknown scheme, missing credentials, ...
            raise InferError(f"cannot open {uri}: {error}") from None
        if filesystem is not None and uri_fs.type_name != filesystem.type_name:
            raise InferError("all URIs of one run must be on one filesystem")
        filesystem = uri_fs
        found = _list_uri(uri_fs, root, recursive)
        if not found:
            echo_err(f"warning: {terminal_text(uri)}: no images found")
        files.extend(found)
    return sorted(set(files)), filesystem


def _list_uri(filesystem: pafs.FileSystem, root: str, recursive: bool) -> list[str]:
    """Image files at ``root``: the file itself, or a folder's visible image files (any depth when recursive)."""
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [root]
    if info.type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(root, recursive=recursive)
    return [
        entry.path
        for entry in filesystem.get_file_info(selector)
        if entry.type == pafs.FileType.File
        and is_image_path(entry.path)
        and not any(part.startswith(".") for part in entry.path[len(root) :].split("/"))
    ]


def screen_files(
    files: Sequence[str], filesystem: pafs.FileSystem | None, max_file_bytes: int
) -> tuple[list[str], list[Row]]:
    """(files Ray may read, error rows for the rest): only regular files of at most ``max_file_bytes``
    are read. Local files are checked with ``os.stat`` (following symlinks), URIs with one listing call."""
    if filesystem is None:
        infos = [_local_info(path) for path in files]
    else:
        infos = [(info.type == pafs.FileType.File, info.size or 0) for info in filesystem.get_file_info(list(files))]
    readable, refused = [], []
    for path, (regular, size) in zip(files, infos, strict=True):
        if not regular:
            refused.append(Row(path, error="not a regular file"))
        elif size > max_file_bytes:
            refused.append(Row(path, error=f"file too large: {size} bytes (limit {max_file_bytes})"))
        else:
            readable.append(path)
    return readable, refused


def _local_info(path: str) -> tuple[bool, int]:
    """(is a regular file, its size); a path that cannot be stat'ed counts as not regular."""
    try:
        info = os.stat(path)
    except OSError:
        return False, 0
    return stat.S_ISREG(info.st_mode), info.st_size


# --- Ray ---------------------------------------------------------------------------------------------


def _connect(address: str | None, progress: bool) -> bool:
    """Join ``address``, or start a local cluster (loopback only, no dashboard); True when we started it.

    Reuses a connection this process already has (a notebook, a test), and leaves it open."""
    ray.data.DataContext.get_current().enable_progress_bars = progress
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return connect_cluster(address, InferError)


def build_dataset(
    files: list[str],
    filesystem: pafs.FileSystem | None,
    classifier: Classifier,
    k: int,
    batch_size: int,
    cluster: ClusterOptions,
    min_probability: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: local paths (as bytes, so any file name travels) or read bytes of URIs,
    classified on an actor pool."""
    actors = cluster.actors or default_actors(cluster)
    threads = max(1, math.floor(cluster.cpus_per_actor))
    if filesystem is None:
        dataset = ray.data.from_items([{"path": os.fsencode(path)} for path in files])
    else:
        dataset = ray.data.read_binary_files(files, include_paths=True, filesystem=filesystem)
    arguments = {"model": classifier.path.read_bytes(), "k": k, "threads": threads,
                 "min_probability": min_probability, "max_pixels": max_pixels}  # fmt: skip
    return dataset.map_batches(
        Predictor,
        fn_constructor_kwargs=arguments,
        batch_size=batch_size,  # Ray's default (1024 rows per batch) is far too many decoded images
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cluster.cpus_per_actor,
        num_gpus=cluster.gpus_per_actor or None,
    )


def default_actors(cluster: ClusterOptions) -> int:
    """As many actors as the cluster's resources hold, one CPU left for the read tasks."""
    resources = ray.cluster_resources()
    by_cpu = int((resources.get("CPU", 1) - 1) // cluster.cpus_per_actor)
    if cluster.gpus_per_actor:
        return max(1, min(by_cpu, int(resources.get("GPU", 0) // cluster.gpus_per_actor)))
    return max(1, by_cpu)


def _tables(dataset: ray.data.Dataset) -> Iterator[pa.Table]:
    """Result blocks as they finish, in the driver."""
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
