"""`fmtl infer --engine ray` (fmtl.runtime.ray_infer) on one local Ray cluster shared by the module.

The cluster has 2 CPUs and the tests run one Classifier actor with one CPU, so Ray's read
tasks always find a CPU. Each test compares the Ray path with `fmtl infer` itself
(fmtl.runtime.infer.run) on real files: Fashion-MNIST test images as PNG when the dataset is
installed, photos in several PIL modes, a truncated and an empty file.

Without ray (the runtime-only venv) only the "missing extra" test runs.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx_fixtures import grey_model, rgb_model
from PIL import Image
from without_ray import fmtl_without_ray

from fmtl.runtime.infer import run as local_run

REPO = Path(__file__).resolve().parents[2]
FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


# --- without the extra ----------------------------------------------------------------------------


def test_engine_ray_without_the_extra_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    model = grey_model(tmp_path)
    Image.new("L", (28, 28), 90).save(tmp_path / "a.png")
    argv = ["infer", str(tmp_path / "a.png"), "--model", str(model), "--engine", "ray", "--out", str(tmp_path / "o")]
    result = fmtl_without_ray(argv, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'pip install "fmtl[ray]"' in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


# --- the shared cluster and data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU cluster on loopback for the whole module; yields its GCS address."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    from fmtl.runtime.ray_infer import start_local_cluster

    address = start_local_cluster(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        assert address.startswith("127.0.0.1:")
        yield address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_infer(cluster):
    from fmtl.runtime import ray_infer

    return ray_infer


def fashion_images(count: int, offset: int = 0) -> np.ndarray:
    """``count`` Fashion-MNIST test images [N, 28, 28] uint8, or seeded stand-ins with the same
    statistics of shape (a bright object on black) where the dataset is not installed."""
    if FASHION_MNIST_TEST.is_file():
        with gzip.open(FASHION_MNIST_TEST) as handle:
            pixels = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        return pixels[offset : offset + count].copy()
    rng = np.random.default_rng(offset)
    images = np.zeros((count, 28, 28), np.uint8)
    for image in images:
        top, left = rng.integers(2, 10, size=2)
        image[top : top + 16, left : left + 12] = rng.integers(60, 255)
    return images


def write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(path)
    return paths


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 Fashion-MNIST PNGs, the same pictures as RGBA, palette, 16-bit and JPEG files, and two bad files."""
    folder = tmp_path_factory.mktemp("grey")
    images = fashion_images(40)
    write_pngs(folder, images)
    Image.fromarray(images[0]).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(images[1]).convert("P").save(folder / "palette.png")
    Image.fromarray(images[2].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    Image.fromarray(np.kron(images[3], np.ones((8, 8), np.uint8))).save(folder / "big.jpg", quality=90)
    good = (folder / "00004.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Colour photos: RGB, an EXIF-rotated JPEG (a rotation mix-up changes the answer), CMYK, LA."""
    folder = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(3)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / f"rgb{i:02d}.png")
    photo = Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: viewers rotate it 90 degrees
    photo.save(folder / "rotated.jpg", exif=exif, quality=95)
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 30, 2), dtype=np.uint8), "LA").save(folder / "grey_alpha.png")
    return folder


def local_rows(model: Path, inputs: list[str], tmp_path: Path, k: int) -> dict[str, dict]:
    """`fmtl infer`'s jsonl rows, keyed by absolute path."""
    out = tmp_path / "local.jsonl"
    assert (
        local_run(inputs, str(model), k=k, fmt="jsonl", output=str(out), progress=False, echo_err=lambda m: None) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {os.path.abspath(row["path"]): row for row in rows}


def assert_same_top_k(ray_row: dict, local_row: dict) -> None:
    assert ray_row["error"] == local_row["error"]
    assert [t["label"] for t in ray_row["top_k"]] == [t["label"] for t in local_row["top_k"]]
    assert [t["index"] for t in ray_row["top_k"]] == [t["index"] for t in local_row["top_k"]]
    for ours, theirs in zip(ray_row["top_k"], local_row["top_k"], strict=True):
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=2e-6)


# --- the Ray path ---------------------------------------------------------------------------------


@pytest.mark.ray
def test_parquet_gives_fmtl_infers_top_k_and_error_rows(ray_infer, grey_folder: Path, tmp_path: Path) -> None:
    model = grey_model(tmp_path)
    messages: list[str] = []
    code = ray_infer.run(
        [str(grey_folder)], str(model), str(tmp_path / "out"), k=2, batch_size=8,
        cluster=ray_infer.ClusterOptions(actors=1, cpus_per_actor=1), progress=False, echo_err=messages.append,
    )  # fmt: skip
    assert code == 0, messages
    table = ray_infer.read_results(tmp_path / "out")
    assert table.schema == ray_infer.SCHEMA
    rows = {row.path: row.to_dict() for row in ray_infer.table_to_rows(table)}
    expected = local_rows(model, [str(grey_folder)], tmp_path, k=2)
    assert table.num_rows == len(rows) == len(expected) == 46
    assert rows.keys() == expected.keys()
    for path, row in rows.items():
        assert_same_top_k(row, expected[path])
    # one bad file never fails the job: two error rows, every other image classified
    errors = {Path(path).name: row["error"] for path, row in rows.items() if row["error"]}
    assert errors == {"empty.png": "empty file", "truncated.png": "truncated image"}
    assert any("error:" in m and "empty.png" in m for m in messages)
    assert "44 images classified, 2 unreadable" in messages[-1]


@pytest.mark.ray
def test_jsonl_from_a_uri_is_fmtl_infers_jsonl(ray_infer, colour_folder: Path, tmp_path: Path) -> None:
    model = rgb_model(tmp_path)
    out = tmp_path / "out"
    code = ray_infer.run(
        [colour_folder.as_uri()], str(model), str(out), k=3, batch_size=4, fmt="jsonl",
        cluster=ray_infer.ClusterOptions(actors=1), progress=False, echo_err=lambda m: None,
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    expected = local_rows(model, [str(colour_folder)], tmp_path, k=3)
    assert sorted(row["path"] for row in lines) == sorted(expected)  # Ray names file:// paths without the scheme
    for row in lines:
        assert set(row) == {"path", "top_k", "error"}
        assert_same_top_k(row, expected[row["path"]])


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_after_a_killed_job_has_every_image_exactly_once(ray_infer, cluster: str, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    paths = write_pngs(folder, fashion_images(3000, offset=1000))
    model, out = grey_model(tmp_path), tmp_path / "out"
    argv = [sys.executable, "-m", "fmtl.cli", "infer", str(folder), "--model", str(model), "--engine", "ray",
            "--address", cluster, "--actors", "1", "--batch-size", "8", "--rows-per-file", "100", "--out", str(out),
            "--quiet", "-k", "1"]  # fmt: skip
    job = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while len(list(out.glob("part-*.parquet"))) < 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(job.pid, signal.SIGKILL)  # no chance to clean up, as with a lost node or an OOM kill
    finally:
        _, stderr = job.communicate(timeout=30)
    assert job.returncode == -signal.SIGKILL, stderr
    done_before = ray_infer.read_results(out).num_rows
    assert 0 < done_before < len(paths), "the kill should land mid-job"

    messages: list[str] = []
    code = ray_infer.run(
        [str(folder)], str(model), str(out), k=1, batch_size=64, rows_per_file=1000,
        cluster=ray_infer.ClusterOptions(actors=1), progress=False, echo_err=messages.append,
    )  # fmt: skip
    assert code == 0, messages
    assert f"3000 images, {done_before} already in {out}/, {3000 - done_before} to classify" in messages
    written = ray_infer.read_results(out)["path"].to_pylist()
    assert sorted(written) == sorted(str(p) for p in paths)  # every image, exactly once
    rows = {row.path: row.to_dict() for row in ray_infer.table_to_rows(ray_infer.read_results(out))}
    for path, row in local_rows(model, [str(folder)], tmp_path, k=1).items():
        assert_same_top_k(rows[path], row)

    messages.clear()  # a third run finds nothing left to do
    assert ray_infer.run([str(folder)], str(model), str(out), k=1, progress=False, echo_err=messages.append) == 0
    assert f"3000 images, 3000 already in {out}/, 0 to classify" in messages


@pytest.mark.ray
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --out DIR"),
        (["--out", "o", "--format", "table"], "parquet or jsonl"),
        (["--out", "o", "-o", "x.jsonl"], "use --out DIR instead of -o"),
        (["--out", "o", "--engine", "local"], "--out needs --engine ray"),
        (["--actors", "2", "--engine", "local"], "--actors needs --engine ray"),
    ],
)
def test_engine_options_are_checked_in_one_line(ray_infer, tmp_path: Path, extra: list[str], message: str) -> None:
    from click.testing import CliRunner

    from fmtl.cli import main

    model = grey_model(tmp_path)
    Image.new("L", (28, 28), 90).save(tmp_path / "a.png")
    engine = [] if "--engine" in extra else ["--engine", "ray"]
    result = CliRunner().invoke(main, ["infer", str(tmp_path / "a.png"), "--model", str(model), *engine, *extra])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.ray
def test_fifo_device_and_odd_names_are_error_rows_not_hangs(ray_infer, tmp_path: Path) -> None:
    """A FIFO named like an image (opening it would block forever), a symlink to /dev/zero (reading it never ends),
    a file over the size cap: error rows, never read. A name that is not UTF-8 is classified and written
    escaped, as `fmtl infer` writes it; --min-probability marks exactly the rows below it."""
    folder = tmp_path / "odd"
    write_pngs(folder, fashion_images(6))
    os.mkfifo(folder / "x\x1b[2J.png")  # with a terminal escape in its name, said escaped on stderr
    os.symlink("/dev/zero", folder / "zero.png")
    (folder / "big.png").write_bytes((folder / "00000.png").read_bytes() + bytes(8192))  # over the 4 KiB cap
    Image.fromarray(fashion_images(1, offset=8)[0]).save(os.path.join(os.fsencode(folder), b"b\xff.png"), "PNG")
    model, out = grey_model(tmp_path), tmp_path / "out"
    expected = local_rows(model, [str(folder / f"{i:05d}.png") for i in range(6)], tmp_path, k=2)
    top1 = {path: row["top_k"][0]["probability"] for path, row in expected.items()}
    ranked = sorted(top1.values())
    threshold = (ranked[2] + ranked[3]) / 2  # halfway, so the 6 decimals of jsonl cannot tip a row over
    messages: list[str] = []
    code = ray_infer.run(
        [str(folder)], str(model), str(out), k=2, batch_size=4, fmt="jsonl", max_file_bytes=4096,
        min_probability=threshold, cluster=ray_infer.ClusterOptions(actors=1), progress=False,
        echo_err=messages.append,
    )  # fmt: skip
    assert code == 0, messages
    rows = {Path(row.path).name: row for row in ray_infer.table_to_rows(ray_infer.read_results(out))}
    assert rows["x\x1b[2J.png"].error == rows["zero.png"].error == "not a regular file"
    assert any("x\\x1b[2J.png: not a regular file" in m for m in messages)
    assert not any("\x1b" in m for m in messages)
    assert rows["big.png"].error.startswith("file too large: ") and "(limit 4096)" in rows["big.png"].error
    assert rows["b\\xff.png"].error is None and len(rows["b\\xff.png"].predictions) == 2
    for path, probability in top1.items():
        assert rows[Path(path).name].unsure is (probability < threshold)
    assert "7 images classified, 3 unreadable" in messages[-1]
