"""fmtl.runtime.classifier.Classifier and fmtl.runtime.infer.run on tiny real ONNX models and real image files."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx_fixtures import GREY_CLASSES, RGB_CLASSES, grey_model, hostile_model, rgb_model, save_model
from PIL import Image

from fmtl.errors import FmtlError
from fmtl.runtime.classifier import Classifier, ModelError, Prediction
from fmtl.runtime.images import DecodeError
from fmtl.runtime.infer import InferError, find_newest_model, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {"grey": grey_model(folder), "rgb": rgb_model(folder)}


def _direct(model: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"images": batch})[0]


def _random_batch(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# --- Classifier ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "classes", "shape"), [("grey", GREY_CLASSES, (1, 28, 28)), ("rgb", RGB_CLASSES, (3, 20, 30))]
)
def test_classifier_reads_metadata_and_matches_onnxruntime(models, kind, classes, shape) -> None:
    clf = Classifier(models[kind])
    assert clf.classes == list(classes) and clf.input_shape == shape
    assert clf.architecture == "linear_test" and clf.spec.channels == shape[0]
    assert clf.spec.source_size == shape[1:] and "weights_sha256" in clf.metadata
    batch = _random_batch(5, shape)
    probs = clf.predict_proba(batch, batch_size=2)  # 3 onnxruntime calls
    np.testing.assert_allclose(probs, _direct(models[kind], batch), rtol=1e-5, atol=1e-6)
    top = clf.predict(batch, k=2)
    assert len(top) == 5 and all(len(row) == 2 for row in top)
    for row, p in zip(top, probs, strict=True):
        assert isinstance(row[0], Prediction)
        assert row[0].index == int(p.argmax()) and row[0].label == classes[row[0].index]
        assert row[0].probability == pytest.approx(float(p.max()), rel=1e-6)
        assert row[0].probability >= row[1].probability


def test_k_is_clamped(models) -> None:
    clf = Classifier(models["grey"])
    batch = _random_batch(2, clf.input_shape)
    assert [len(r) for r in clf.predict(batch, k=50)] == [3, 3]
    assert [len(r) for r in clf.predict(batch, k=0)] == [1, 1]
    assert sum(p.probability for p in clf.predict(batch, k=50)[0]) == pytest.approx(1.0, abs=1e-5)


def test_predict_on_files_pil_and_arrays(models, tmp_path: Path) -> None:
    clf = Classifier(models["rgb"])
    batch = _random_batch(3, clf.input_shape, seed=4)
    paths = []
    for i, chw in enumerate(batch):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(chw.transpose(1, 2, 0)).save(paths[-1])  # already at the source size: lossless
    expected = clf.predict(batch, k=4)
    assert clf.predict(paths, k=4) == expected
    assert clf.predict([str(p) for p in paths], k=4) == expected
    assert clf.predict([Image.open(p) for p in paths], k=4) == expected
    assert clf.predict(list(batch), k=4) == expected  # CHW arrays
    assert clf.predict(str(paths[0]), k=4) == expected[:1]
    assert clf.predict([], k=4) == []


def test_predict_resizes_other_sizes(models, tmp_path: Path) -> None:
    clf = Classifier(models["grey"])
    Image.new("RGBA", (300, 90), (255, 255, 255, 255)).save(tmp_path / "big.png")
    [top] = clf.predict([tmp_path / "big.png"], k=3)
    direct = _direct(models["grey"], np.full((1, 1, 28, 28), 255, np.uint8))[0]
    assert [p.index for p in top] == list(np.argsort(-direct))


def test_predict_names_undecodable_file(models, tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(DecodeError, match=r"bad\.png: not an image"):
        Classifier(models["grey"]).predict([tmp_path / "bad.png"])


def test_bad_batches_are_refused(models) -> None:
    clf = Classifier(models["grey"])
    with pytest.raises(ValueError, match="uint8"):
        clf.predict_proba(np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"shape \[N, 1, 28, 28\]"):
        clf.predict_proba(np.zeros((1, 3, 28, 28), np.uint8))
    assert clf.predict_proba(np.zeros((0, 1, 28, 28), np.uint8)).shape == (0, 3)


def test_model_errors(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="builds broken graphs with onnx (the full install)")
    (tmp_path / "text.onnx").write_text("this is not onnx")
    no_meta = save_model(tmp_path / "plain.onnx", with_metadata=False)
    wrong_input = save_model(tmp_path / "wrong.onnx", input_name="pixels")
    float_input = save_model(tmp_path / "float.onnx", input_type=onnx.TensorProto.FLOAT)
    cases = {
        tmp_path / "missing.onnx": "model not found",
        tmp_path / "text.onnx": "not a valid ONNX model",
        no_meta: "no fmtl metadata",
        wrong_input: "expected one input 'images'",
        float_input: "expected one input 'images' of uint8",
    }
    for path, message in cases.items():
        with pytest.raises(ModelError, match=message) as info:
            Classifier(path)
        assert "\n" not in str(info.value)
    # the CLI turns FmtlError into a one-line message
    assert issubclass(ModelError, FmtlError) and issubclass(InferError, FmtlError)


def test_metadata_that_contradicts_the_graph(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="edits a graph with onnx (the full install)")
    model = onnx.load(str(grey_model(tmp_path)))
    for prop in model.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(["only", "two"])
    onnx.save(model, str(tmp_path / "two.onnx"))
    with pytest.raises(ModelError, match="does not match 2 classes"):
        Classifier(tmp_path / "two.onnx")


def test_threads_and_providers_options(models) -> None:
    clf = Classifier(models["grey"], providers=["CPUExecutionProvider"], threads=1)
    assert clf.session.get_providers() == ["CPUExecutionProvider"]


# --- infer.run -----------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """3 good images (different sizes and modes), 2 broken ones, a non-image file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("L", (28, 28), 10).save(folder / "a_dark.png")
    Image.new("RGB", (64, 40), (250, 250, 250)).save(folder / "b_bright.JPG")
    Image.new("RGBA", (5, 9), (100, 100, 100, 128)).save(folder / "c_half.webp")
    (folder / "d_empty.png").write_bytes(b"")
    (folder / "e_text.png").write_text("hello")
    (folder / "notes.txt").write_text("ignored")
    return folder


class Capture:
    """Collects what run() says on stdout and stderr."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.err: list[str] = []

    def kwargs(self) -> dict:
        return {"echo": self.out.append, "echo_err": self.err.append, "progress": False}

    @property
    def stdout(self) -> str:
        """What run() printed (it prints each row as it comes, so echo is called many times)."""
        return "".join(line + "\n" for line in self.out)


def _run(inputs, model, fmt="csv", k=5, output=None, recursive=False) -> tuple[int, Capture]:
    cap = Capture()
    code = run([str(i) for i in inputs], str(model) if model else None, k, 2, fmt, output, recursive, **cap.kwargs())
    return code, cap


def test_run_csv_parses_back(models, photos: Path) -> None:
    code, cap = _run([photos], models["grey"], fmt="csv", k=50)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(cap.stdout)))
    assert [Path(r["path"]).name for r in rows] == [
        "a_dark.png",
        "b_bright.JPG",
        "c_half.webp",
        "d_empty.png",
        "e_text.png",
    ]
    assert set(rows[0]) == {"path", "error"} | {f"rank{r}_{w}" for r in (1, 2, 3) for w in ("label", "prob")}
    assert rows[0]["rank1_label"] in GREY_CLASSES and rows[0]["error"] == ""
    assert sum(float(rows[0][f"rank{r}_prob"]) for r in (1, 2, 3)) == pytest.approx(1.0, abs=1e-4)
    assert rows[3]["error"] == "empty file" and rows[3]["rank1_label"] == ""
    assert rows[4]["error"] == "not an image (cannot identify)"
    assert any("d_empty.png: empty file" in line for line in cap.err)
    assert any("model: " in line and "grey.onnx" in line for line in cap.err)


def test_run_agrees_with_classifier(models, photos: Path) -> None:
    code, cap = _run([photos / "b_bright.JPG"], models["rgb"], fmt="jsonl", k=2)
    assert code == 0
    [row] = [json.loads(line) for line in cap.stdout.splitlines()]
    [top] = Classifier(models["rgb"]).predict([photos / "b_bright.JPG"], k=2)
    assert [(p["label"], p["index"]) for p in row["top_k"]] == [(p.label, p.index) for p in top]
    assert row["top_k"][0]["probability"] == pytest.approx(top[0].probability, abs=1e-6)
    assert row["error"] is None


def test_run_json_to_file_atomically(models, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "preds.json"
    code, cap = _run([photos], models["grey"], fmt="json", k=2, output=out)
    assert code == 0 and cap.out == []
    document = json.loads(out.read_text())
    assert document["model"] == str(models["grey"]) and document["k"] == 2
    assert document["classes"] == list(GREY_CLASSES)
    assert len(document["predictions"]) == 5
    assert [len(p["top_k"]) for p in document["predictions"]] == [2, 2, 2, 0, 0]
    assert os.listdir(out.parent) == ["preds.json"]  # no temporary file left behind


def test_run_table_and_jsonl(models, photos: Path) -> None:
    code, cap = _run([photos / "a_dark.png", photos / "d_empty.png"], models["grey"], fmt="table", k=2)
    assert code == 0
    lines = cap.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("%") and lines[1].endswith("error: empty file")
    column = len(str(photos / "d_empty.png")) + 2  # the longer path, then two spaces
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines)  # aligned
    code, cap = _run([photos], models["grey"], fmt="jsonl")
    assert [json.loads(line)["path"].endswith(".png") for line in cap.stdout.splitlines()].count(True) == 3


def test_run_exit_codes(models, photos: Path, tmp_path: Path) -> None:
    code, cap = _run([photos / "d_empty.png", photos / "e_text.png"], models["grey"])
    assert code == 1 and "could be read" in cap.err[-1]
    code, cap = _run([tmp_path / "nowhere"], models["grey"])
    assert code == 1 and any("no such file" in line for line in cap.err)
    with pytest.raises(InferError, match="model not found"):
        _run([photos], tmp_path / "missing.onnx")
    (tmp_path / "fake.onnx").write_text("x")
    with pytest.raises(InferError, match="not a valid ONNX model"):
        _run([photos], tmp_path / "fake.onnx")
    with pytest.raises(InferError, match="unknown format"):
        _run([photos], models["grey"], fmt="xml")


def test_newest_model_is_used_by_default(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InferError, match="no --model given"):
        find_newest_model()
    (tmp_path / "export").mkdir()
    with pytest.raises(InferError, match="no .onnx model in export"):
        find_newest_model()
    old = rgb_model(tmp_path / "export", "old.onnx")
    new = grey_model(tmp_path / "export", "new.onnx")
    os.utime(old, (2_000_000_000, 2_000_000_000))  # old.onnx is now the newest
    assert find_newest_model() == Path("export/old.onnx")
    os.utime(new, (2_000_000_100, 2_000_000_100))
    code, cap = _run([photos], None, fmt="csv")
    assert code == 0 and any("export/new.onnx" in line and "newest" in line for line in cap.err)


def test_runtime_modules_do_not_import_torch() -> None:
    """Every module of the torch-free side, fmtl.runtime.serve's too (and the CLI, and fmtl itself), imports
    without torch."""
    code = (
        "import importlib, pkgutil, sys, fmtl, fmtl.cli, fmtl.runtime\n"
        "for info in pkgutil.walk_packages(fmtl.runtime.__path__, 'fmtl.runtime.'):\n"
        "    if info.name.split('.')[-1] not in OPTIONAL: importlib.import_module(info.name)\n"
        "assert {'fmtl.runtime.serve.protocol', 'fmtl.runtime.serve.api'} <= set(sys.modules)  # subpackages walked\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'accelerate', 'onnx') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", f"OPTIONAL = {sorted(OPTIONAL_RUNTIME_MODULES)!r}\n" + code],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# Runtime modules that need an optional extra (they still never import torch).
OPTIONAL_RUNTIME_MODULES = {"ray_cluster", "ray_infer", "ray_parts", "ray_engine"}


# --- output safety: file and class names are untrusted text --------------------------------------

HOSTILE_FILES = {  # name on disk -> how every format writes it
    b"b\xff.png": "b\\xff.png",  # not UTF-8
    b"esc\x1b[31mred.png": None,  # a terminal escape: escaped in the table only
    b"line\nbreak.png": None,
    b"=HYPERLINK(2).png": None,  # a spreadsheet formula
    b"+1.png": None,
    b"-1.png": None,
    b"@sum.png": None,
}


@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hostile"
    folder.mkdir()
    for i, name in enumerate(HOSTILE_FILES):
        Image.new("L", (28, 28), 30 * i).save(os.path.join(os.fsencode(folder), name), format="PNG")
    return folder


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real command, its stdout and stderr as bytes (a UTF-8 locale, as a terminal has)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    command = [sys.executable, "-m", "fmtl.cli", "infer", *args, "--quiet"]
    return subprocess.run(command, cwd=cwd, capture_output=True, timeout=120, env=env)


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "jsonl"])
@pytest.mark.parametrize("to_file", [False, True])
def test_cli_writes_hostile_file_names_safely(models, hostile_folder: Path, tmp_path: Path, fmt, to_file) -> None:
    out = tmp_path / f"out.{fmt}"
    # run inside the folder, so each path cell is the bare name (a formula if the name is one)
    result = _cli(".", "--model", str(models["grey"]), "--format", fmt,
                  *(["-o", str(out)] if to_file else []), cwd=hostile_folder)  # fmt: skip
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    text = (out.read_bytes() if to_file else result.stdout).decode("utf-8")  # valid UTF-8, or this raises
    names = _written_names(text, fmt)
    assert len(names) == len(HOSTILE_FILES)
    assert "b\\xff.png" in names  # the undecodable byte as a backslash escape
    if fmt == "table":
        assert "esc\\x1b[31mred.png" in names and "line\\nbreak.png" in names
        assert "\x1b" not in text and not any(char in text for char in "\r\x0b\x0c")
    elif fmt == "csv":
        assert {"'=HYPERLINK(2).png", "'+1.png", "'-1.png", "'@sum.png", "esc\x1b[31mred.png"} <= names
        assert "line\nbreak.png" in names  # a quoted cell: CSV keeps the name as it is
    else:
        assert {"=HYPERLINK(2).png", "esc\x1b[31mred.png", "line\nbreak.png"} <= names  # JSON escapes these itself


def _written_names(text: str, fmt: str) -> set[str]:
    """The file names (without the folder) as ``fmt`` wrote them."""
    if fmt == "table":
        return {line.split("  ")[0].rstrip().rsplit("/", 1)[-1] for line in text.splitlines()}
    if fmt == "csv":
        return {row["path"].rsplit("/", 1)[-1] for row in csv.DictReader(io.StringIO(text))}
    rows = json.loads(text)["predictions"] if fmt == "json" else [json.loads(line) for line in text.splitlines()]
    return {row["path"].rsplit("/", 1)[-1] for row in rows}


def test_cli_hostile_class_names_and_stderr(tmp_path: Path) -> None:
    """A model whose class names are a formula, a terminal escape and a newline: shown as text; an
    unreadable file with an escape in its name is reported on stderr escaped."""
    model = hostile_model(tmp_path)
    Image.new("L", (28, 28), 200).save(tmp_path / "a.png")
    (tmp_path / "bad\x1b]0;title\x07.png").write_bytes(b"not an image")
    table = _cli(str(tmp_path), "--model", str(model), "-k", "3", cwd=tmp_path)
    assert table.returncode == 0
    assert b"\x1b" not in table.stdout and b"\x1b" not in table.stderr
    assert "\\x1b[2Jclear" in table.stdout.decode() and "two\\nlines" in table.stdout.decode()
    assert "bad\\x1b]0;title\\x07.png: not an image" in table.stderr.decode()
    rows = list(csv.DictReader(io.StringIO(_cli(str(tmp_path / "a.png"), "--model", str(model), "-k", "3",
                                                "--format", "csv", cwd=tmp_path).stdout.decode())))  # fmt: skip
    labels = {rows[0][f"rank{r}_label"] for r in (1, 2, 3)}
    assert labels == {"'=HYPERLINK(1)", "\x1b[2Jclear", "two\nlines"}


# --- --min-probability: "not sure" as an answer ---------------------------------------------------


def test_classifier_marks_exactly_the_predictions_below_min_probability(models) -> None:
    clf = Classifier(models["grey"])
    batch = _random_batch(64, clf.input_shape, seed=5)
    top1 = clf.predict_proba(batch).max(axis=1)
    threshold = float(np.median(top1))
    tops = clf.predict(batch, k=2, min_probability=threshold)
    assert [top.unsure for top in tops] == [bool(p < threshold) for p in top1]
    assert 0 < sum(top.unsure for top in tops) < len(tops)
    assert all(len(top) == 2 and isinstance(top[0], Prediction) for top in tops)  # still a list of Predictions
    assert not any(top.unsure for top in clf.predict(batch, k=2))  # no threshold: nothing unsure
    at_exactly = clf.top_k(clf.predict_proba(batch[:1]), 1, min_probability=float(top1[0]))
    assert at_exactly[0].unsure is False  # below, not at
    with pytest.raises(ValueError, match="within 0..1"):
        clf.predict(batch, min_probability=1.5)


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "jsonl"])
def test_cli_min_probability_marks_exactly_those_below(models, tmp_path: Path, fmt: str) -> None:
    images = _random_batch(12, (28, 28), seed=9)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
    clf = Classifier(models["grey"])
    top1 = clf.predict_proba(images[:, None]).max(axis=1)
    threshold = float(np.median(top1))
    expected = [bool(p < threshold) for p in top1]
    result = _cli(str(tmp_path), "--model", str(models["grey"]), "--format", fmt, "-k", "2",
                  "--min-probability", str(threshold), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    if fmt == "table":
        marked = [line.split("  ", 1)[1].lstrip().startswith("unsure: ") for line in text.splitlines()]
        assert all(line.count("%") == 2 for line in text.splitlines())  # top-k still listed
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        marked = [row["unsure"] == "true" for row in rows]
        assert all(row["unsure"] in ("true", "false") and row["rank2_label"] for row in rows)
    else:
        rows = json.loads(text)["predictions"] if fmt == "json" else [json.loads(line) for line in text.splitlines()]
        marked = [row["unsure"] for row in rows]
        assert all(len(row["top_k"]) == 2 for row in rows)
        if fmt == "json":
            assert json.loads(text)["min_probability"] == threshold
    assert marked == expected and 0 < sum(expected) < len(expected)


def test_without_min_probability_nothing_changes(models, photos: Path) -> None:
    """No threshold: no unsure column or key, as before the option existed."""
    code, cap = _run([photos], models["grey"], fmt="csv", k=1)
    assert "unsure" not in cap.stdout.splitlines()[0]
    code, cap = _run([photos], models["grey"], fmt="jsonl", k=1)
    assert all("unsure" not in json.loads(line) for line in cap.stdout.splitlines())
    result = _cli(str(photos), "--model", str(models["grey"]), "--min-probability", "1.5", cwd=photos)
    assert result.returncode == 2 and b"Traceback" not in result.stderr


def test_cli_max_pixels_refuses_bigger_images_before_decoding(models, tmp_path: Path) -> None:
    Image.new("L", (28, 28), 90).save(tmp_path / "small.png")
    Image.new("L", (40, 30), 90).save(tmp_path / "big.png")
    Image.fromarray(np.full((20, 20), 0.5, np.float32)).save(tmp_path / "float.tif")  # 400 pixels, 4 bytes each
    result = _cli(".", "--model", str(models["grey"]), "--max-pixels", "1000", "--format", "jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    errors = {row["path"]: row["error"] for row in map(json.loads, result.stdout.decode().splitlines())}
    assert errors == {
        "big.png": "image too large: 40x30 = 1200 pixels (limit 1000 pixels)",
        "float.tif": "image too large: 20x20 = 400 pixels counted x4 for 32-bit F (limit 1000 pixels)",
        "small.png": None,
    }


def test_the_two_halves_of_the_rows_path_give_what_classify_decoded_gives(models, photos: Path) -> None:
    """serve runs the model its own way, through its batcher (fmtl.runtime.serve.app.classify): keep_decoded,
    its probabilities, make_rows; that gives what classify_decoded gives."""
    from fmtl.runtime.images import decode_many
    from fmtl.runtime.results import classify_decoded, keep_decoded, make_rows

    clf = Classifier(models["grey"])
    names = sorted(str(p) for p in photos.iterdir() if p.suffix != ".txt")
    decoded = decode_many(names, 1, (28, 28))
    rows = classify_decoded(clf, names, decoded, k=2, min_probability=0.5)
    good, batch = keep_decoded(decoded)
    assert good == [0, 1, 2] and batch.shape == (3, 1, 28, 28)
    assert make_rows(clf, names, decoded, good, clf.predict_proba(batch), 2, 0.5) == rows
    assert [row.error for row in rows] == [None, None, None, "empty file", "not an image (cannot identify)"]
    assert [row.unsure for row in rows[:3]] == [row.predictions[0].probability < 0.5 for row in rows[:3]]
    assert rows[3].unsure is None and rows[3].to_dict() == {"path": names[3], "top_k": [], "error": "empty file"}
    assert make_rows(clf, names[3:], decoded[3:], [], None, 2) == rows[3:]  # nothing decoded: no model call
