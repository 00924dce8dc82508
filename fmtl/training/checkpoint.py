"""What a run leaves behind, written so that a crash can never lose it.

- ``model.safetensors`` + ``model.json``: the best model and everything needed to use it
  (architecture, classes, input spec, head, metrics), no pickle;
- ``state/``: Accelerate's full training state (model, optimizer, scheduler, scaler, RNG)
  plus ``trainer.json`` (epoch, history), for ``--resume``. It is written to ``state.tmp``
  and swapped in by renames, so an interrupted save leaves the previous state intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from fmtl import __version__
from fmtl.atomic import atomic_write_text, publish, temp_path_beside
from fmtl.errors import FmtlError
from fmtl.spec import InputSpec

MODEL_WEIGHTS, MODEL_INFO, STATE_DIR, TRAINER_STATE = "model.safetensors", "model.json", "state", "trainer.json"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(run_dir: str | os.PathLike, model, info: dict) -> dict:
    """Write the weights and model.json atomically; returns model.json's content (with the sha256 added)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    target = run_dir / MODEL_WEIGHTS
    tmp = temp_path_beside(target)
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": "pt", "architecture": info["architecture"]})
        publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    info = {**info, "fmtl_version": __version__, "weights_sha256": sha256_file(target)}
    write_model_info(run_dir, info)
    return info


def write_model_info(run_dir: str | os.PathLike, info: dict) -> None:
    atomic_write_text(Path(run_dir) / MODEL_INFO, json.dumps(info, indent=2) + "\n")


def read_model_info(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / MODEL_INFO
    if not path.is_file() or not (Path(run_dir) / MODEL_WEIGHTS).is_file():
        raise FmtlError(f"{run_dir} is not a run folder with a trained model ({MODEL_INFO} + {MODEL_WEIGHTS})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FmtlError(f"{path} is damaged: {error}") from None


def load_model(run_dir: str | os.PathLike):
    """The trained model of a run folder (eval mode, CPU), its model.json and its InputSpec."""
    from safetensors.torch import load_file

    from fmtl.training.models import create_model

    info = read_model_info(run_dir)
    model = create_model(info["architecture"], info["num_classes"], weights=None, head=info.get("head", "linear"))
    model.load_state_dict(load_file(str(Path(run_dir) / MODEL_WEIGHTS)))
    return model.eval(), info, InputSpec.from_dict(info["input_spec"])


def save_training_state(accelerator, run_dir: str | os.PathLike, trainer_state: dict) -> None:
    """Accelerate's save_state into state.tmp, then swapped in by renames (all processes call this)."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / STATE_DIR, run_dir / f"{STATE_DIR}.tmp", run_dir / f"{STATE_DIR}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_training_state(run_dir: str | os.PathLike) -> Path:
    """The last complete state folder; ``state.old`` covers a crash between the two renames."""
    for name in (STATE_DIR, f"{STATE_DIR}.old"):
        candidate = Path(run_dir) / name
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    raise FmtlError(f"{run_dir} has no saved training state to resume from (was it run with --no-save-state?)")


def load_training_state(accelerator, run_dir: str | os.PathLike) -> dict:
    folder = find_training_state(run_dir)
    accelerator.load_state(str(folder))
    return json.loads((folder / TRAINER_STATE).read_text())
