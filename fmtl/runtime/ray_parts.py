"""The part files of `fmtl infer --engine ray`: result rows as Arrow tables, written and read back.

Each part file (``part-*.parquet`` or ``part-*.jsonl``, in SCHEMA) is written atomically
(fmtl.atomic), so it is complete or absent; the paths already written let a rerun skip
what a killed job finished. Needs pyarrow (the ray extra); ``fmtl.runtime.ray_infer``
imports this module only after checking that the extra is installed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fmtl.atomic import atomic_open
from fmtl.runtime.classifier import Prediction
from fmtl.runtime.infer import Echo, InferError
from fmtl.runtime.results import Row
from fmtl.runtime.text import shown_name, terminal_text

FORMATS = ("parquet", "jsonl")
PART_PREFIX = "part-"

# One schema for every part file, so a batch of only errors (empty lists) still unifies with the rest.
SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # as Ray read it: absolute for local files, "bucket/key" for object stores
        ("labels", pa.list_(pa.string())),  # top-k class names, most probable first; [] on error
        ("indices", pa.list_(pa.int32())),  # their class indices
        ("probabilities", pa.list_(pa.float32())),  # their softmax probabilities
        ("error", pa.string()),  # why the file could not be decoded, else null
        ("unsure", pa.bool_()),  # top-1 probability below --min-probability; null without one, or on error
    ]
)


def rows_to_table(rows: Sequence[Row]) -> pa.Table:
    """fmtl infer's Rows as a table in SCHEMA (paths and labels as ``shown_name`` writes them)."""
    return pa.Table.from_pydict(
        {
            "path": [shown_name(row.path) for row in rows],
            "labels": [[shown_name(p.label) for p in row.predictions] for row in rows],
            "indices": [[p.index for p in row.predictions] for row in rows],
            "probabilities": [[p.probability for p in row.predictions] for row in rows],
            "error": [row.error for row in rows],
            "unsure": [row.unsure for row in rows],
        },
        schema=SCHEMA,
    )


def table_to_rows(table: pa.Table) -> list[Row]:
    """A table in SCHEMA back to fmtl infer's Rows."""
    columns = _conform(table).to_pydict()
    return [
        Row(path, [Prediction(*top) for top in zip(labels, indices, probs, strict=True)], error, unsure)
        for path, labels, indices, probs, error, unsure in zip(*columns.values(), strict=True)
    ]


def _conform(table: pa.Table) -> pa.Table:
    """``table`` with SCHEMA's columns in its order; a column that part files written before it existed
    lack (``unsure``) is added as nulls."""
    for field in SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def _parts(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob(f"{PART_PREFIX}*") if p.suffix.lstrip(".") in FORMATS)


def written_paths(out_dir: Path, fmt: str) -> set[str]:
    """Paths already in ``out_dir``'s part files. Temporary files left by a killed writer are removed;
    part files of the other format, or unreadable ones, are refused (never silently deleted)."""
    if not out_dir.is_dir():
        return set()
    for leftover in out_dir.glob(f".{PART_PREFIX}*.tmp"):
        leftover.unlink(missing_ok=True)
    done: set[str] = set()
    for part in _parts(out_dir):
        if part.suffix != f".{fmt}":
            raise InferError(
                f"{out_dir} holds {part.suffix[1:]} parts: pass --format {part.suffix[1:]} or another --out"
            )
        done.update(_read_part(part, ["path"])["path"].to_pylist())
    return done


def _read_part(part: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        if part.suffix == ".parquet":
            return pq.read_table(part, columns=columns)
        with part.open(encoding="utf-8") as handle:
            return rows_to_table([_row_from_dict(json.loads(line)) for line in handle if line.strip()])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as error:
        raise InferError(f"cannot read {part} ({error}): move it away to classify its images again") from None


def _row_from_dict(item: dict) -> Row:
    tops = [Prediction(t["label"], t["index"], t["probability"]) for t in item["top_k"]]
    return Row(item["path"], tops, item["error"], item.get("unsure"))


def read_results(out_dir: str | Path) -> pa.Table:
    """Every row of every part file in ``out_dir``, in SCHEMA."""
    parts = _parts(Path(out_dir))
    if not parts:
        return SCHEMA.empty_table()
    return pa.concat_tables([_conform(_read_part(part)) for part in parts])


def write_parts(tables: Iterable[pa.Table], out_dir: Path, fmt: str, rows_per_file: int, echo_err: Echo) -> None:
    """Gather result tables into part files of ``rows_per_file`` rows, each written atomically,
    and report every error row on stderr as ``fmtl infer`` does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    pending: list[pa.Table] = []
    count = written = 0
    for table in tables:
        for path, error in zip(table["path"].to_pylist(), table["error"].to_pylist(), strict=True):
            if error is not None:
                echo_err(f"error: {terminal_text(path)}: {error}")
        pending.append(table)
        count += table.num_rows
        while count >= rows_per_file:
            merged = pa.concat_tables(pending)
            _write_part(merged.slice(0, rows_per_file), out_dir / f"{PART_PREFIX}{run_id}-{written:05d}.{fmt}")
            written += 1
            pending, count = [merged.slice(rows_per_file)], count - rows_per_file
    if count:
        _write_part(pa.concat_tables(pending), out_dir / f"{PART_PREFIX}{run_id}-{written:05d}.{fmt}")


def _write_part(table: pa.Table, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        if path.suffix == ".parquet":
            pq.write_table(table, handle)
        else:
            handle.write("".join(json.dumps(row.to_dict()) + "\n" for row in table_to_rows(table)).encode())


def summarise(out_dir: Path, fmt: str, expected: set[str], echo_err: Echo) -> int:
    """Say what ``out_dir`` now holds for this run's images; 0 when all are there and one was classified."""
    table = read_results(out_dir) if out_dir.is_dir() else SCHEMA.empty_table()
    errors = {path: error for path, error in zip(table["path"].to_pylist(), table["error"].to_pylist(), strict=True)}
    ours = {path: error for path, error in errors.items() if path in expected}
    failed = sum(error is not None for error in ours.values())
    classified = len(ours) - failed
    missing = len(expected) - len(ours)
    if not expected:
        echo_err("error: no images found")
        return 1
    echo_err(
        f"{classified} images classified" + (f", {failed} unreadable" if failed else "") + f": {_parts_note(out_dir)}"
    )
    if missing:
        echo_err(f"error: {missing} images are missing from {out_dir}/: run the same command again")
        return 1
    return 0 if classified else 1


def _parts_note(out_dir: Path) -> str:
    parts = _parts(out_dir)
    return f"{len(parts)} {'file' if len(parts) == 1 else 'files'} in {out_dir}/"
