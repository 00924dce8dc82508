"""Hostile and truncated files in every place fmtl reads: one line naming the file, nothing executed,
nothing written. (The training state's files: test_resume.py.)"""

from __future__ import annotations

import gzip
import pickle
import shutil
import sys
from pathlib import Path

import onnx
import pytest
from faults import SMALL, one_error_line

from fmtl.errors import EXIT_USER_ERROR, FmtlError
from fmtl.runtime.infer import run as infer
from fmtl.spec import META_CLASSES, META_INPUT_SPEC
from fmtl.train import main as train_main
from fmtl.training.data import FASHION_MNIST_FILES, SYSTEM_DATA_DIR, load_dataset
from fmtl.training.evaluate import evaluate
from fmtl.training.export import export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from onnx_fixtures import grey_model  # noqa: E402


class Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def assert_one_line(error: BaseException, names: str) -> None:
    assert isinstance(error, FmtlError), type(error)
    assert "\n" not in str(error) and names in str(error), str(error)


# ---------------------------------------------------------------- a run folder: model.safetensors, model.json


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


RUN_FILES = {
    "model.safetensors truncated": ("model.safetensors", lambda p, m: _truncate(p)),
    "model.safetensors a pickle": ("model.safetensors", lambda p, m: p.write_bytes(pickle.dumps(Hostile(m)))),
    "model.json truncated": ("model.json", lambda p, m: _truncate(p)),
    "model.json of another shape": ("model.json", lambda p, m: p.write_text('{"architecture": 3}')),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", RUN_FILES)
@pytest.mark.parametrize("reader", ["export", "evaluate"])
def test_a_damaged_run_folder(reference, tmp_path, case, reader):
    name, damage = RUN_FILES[case]
    run, marker = Path(shutil.copytree(reference, tmp_path / "run")), tmp_path / "pwned"
    damage(run / name, marker)
    with pytest.raises(FmtlError) as caught:
        if reader == "export":
            export_onnx(run, tmp_path / "model.onnx", parity_images=8, echo=lambda *a: None)
        else:
            evaluate(str(run), split="test", batch_size=64, echo=lambda *a: None)
    assert "\n" not in str(caught.value)
    assert not marker.exists() and not (tmp_path / "model.onnx").exists()


# ---------------------------------------------------------------- config.yaml


@pytest.mark.slow
@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: [3\n", "is not valid YAML"),
        ("!!python/object/apply:os.system ['touch {marker}']\n", "is not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("epochs: three\n", "epochs must be int"),
    ],
)
def test_a_damaged_config_yaml_stops_resume(reference, tmp_path, capsys, text, message):
    run, marker = Path(shutil.copytree(reference, tmp_path / "run")), tmp_path / "pwned"
    (run / "config.yaml").write_text(text.format(marker=marker))
    assert train_main([*SMALL, "--resume", str(run)]) == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert message in line and str(run / "config.yaml") in line
    assert not marker.exists()


# ---------------------------------------------------------------- ONNX files and their metadata


def _metadata(path: Path, key: str, value: str) -> None:
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, str(path))


ONNX_FILES = {
    "truncated": lambda p: _truncate(p),
    "not ONNX at all": lambda p: p.write_bytes(pickle.dumps({"a": 1})),
    "classes not JSON": lambda p: _metadata(p, META_CLASSES, "[dark, medium"),
    "input spec of another shape": lambda p: _metadata(p, META_INPUT_SPEC, '{"channels": "x"}'),
    "classes of the wrong count": lambda p: _metadata(p, META_CLASSES, '["only one"]'),
}


@pytest.mark.parametrize("case", ONNX_FILES)
def test_a_damaged_onnx_file(tmp_path, case):
    model = grey_model(tmp_path)
    ONNX_FILES[case](model)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("L", (28, 28), 9).save(image)
    with pytest.raises(FmtlError) as caught:
        infer([str(image)], str(model), echo=lambda *a: None, echo_err=lambda *a: None, progress=False)
    assert_one_line(caught.value, str(model))


# ---------------------------------------------------------------- CSV and IDX data


CSV_FILES = {
    "a pixel that is not a number": "label,p1,p2,p3,p4\n0,1,2,3,4\n1,1,x,3,4\n",
    "a short row": "label,p1,p2,p3,p4\n0,1,2,3,4\n1,1,2\n",
    "a pixel over 255": "label,p1,p2,p3,p4\n0,1,2,3,4\n1,1,2,3,999\n",
    "empty": "",
}


@pytest.mark.parametrize("case", CSV_FILES)
def test_a_damaged_csv(tmp_path, case):
    path = tmp_path / "data.csv"
    path.write_text(CSV_FILES[case])
    with pytest.raises(FmtlError) as caught:
        load_dataset(str(path), "train", val_fraction=0.0)
    assert_one_line(caught.value, str(path))


IDX_FILES = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "wrong magic": lambda raw: b"\x00\x00\x09\x99" + raw[4:],
    "header only": lambda raw: raw[:16],
}


@pytest.mark.parametrize("case", IDX_FILES)
def test_a_damaged_idx_file(tmp_path, case):
    folder = tmp_path / "fashion-mnist"
    shutil.copytree(SYSTEM_DATA_DIR, folder)
    images = next(folder.glob(FASHION_MNIST_FILES["test"][0] + "*"))
    raw = gzip.decompress(images.read_bytes()) if images.suffix == ".gz" else images.read_bytes()
    damaged = IDX_FILES[case](raw)
    images.write_bytes(gzip.compress(damaged, compresslevel=1) if images.suffix == ".gz" else damaged)
    with pytest.raises(FmtlError) as caught:
        load_dataset("fashion-mnist", "test", data_dir=str(folder))
    assert_one_line(caught.value, str(images))


def test_a_truncated_gzip_idx_file(tmp_path):
    folder = tmp_path / "fashion-mnist"
    shutil.copytree(SYSTEM_DATA_DIR, folder)
    images = next(folder.glob(FASHION_MNIST_FILES["test"][0] + "*.gz"))
    images.write_bytes(images.read_bytes()[:5000])  # the compressed stream itself cut short
    with pytest.raises(FmtlError) as caught:
        load_dataset("fashion-mnist", "test", data_dir=str(folder))
    assert_one_line(caught.value, str(images))
