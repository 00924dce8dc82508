"""What a run leaves behind, written so that a crash can never lose it.

- ``model.safetensors`` + ``model.json``: the best model and everything needed to use it
  (architecture, classes, input spec, head, metrics), no pickle;
- ``state/``: Accelerate's model, optimizer, scheduler and scaler files, fmtl's ``rng.json``
  (every random generator of every process) and ``trainer.json`` (epoch, step, history, the
  sha256 of each file), for ``--resume``. It is written to ``state.tmp`` and swapped in by
  renames, so an interrupted save leaves the previous state intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from fmtl import __version__
from fmtl.atomic import atomic_write_text, publish, temp_path_beside, write_errors
from fmtl.errors import FmtlError, StateError, one_line
from fmtl.spec import RunInfo
from fmtl.training.models import create_model

MODEL_WEIGHTS, MODEL_INFO, STATE_DIR, TRAINER_STATE = "model.safetensors", "model.json", "state", "trainer.json"
RNG_STATE = "rng.json"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(run_dir: str | os.PathLike, model, info: RunInfo) -> RunInfo:
    """Write the weights and model.json atomically; returns model.json's content (sha256 and version added)."""
    run_dir = Path(run_dir)
    target = run_dir / MODEL_WEIGHTS
    tmp = temp_path_beside(target)
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": "pt", "architecture": info.architecture})
        publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    info = dataclasses.replace(info, fmtl_version=__version__, weights_sha256=sha256_file(target))
    write_model_info(run_dir, info)
    return info


def write_model_info(run_dir: str | os.PathLike, info: RunInfo) -> None:
    atomic_write_text(Path(run_dir) / MODEL_INFO, json.dumps(info.to_dict(), indent=2) + "\n")


def read_model_info(run_dir: str | os.PathLike) -> RunInfo:
    """A run folder's model.json.

    Raises:
        FmtlError: not a run folder, or model.json is damaged or does not describe a model.
    """
    path = Path(run_dir) / MODEL_INFO
    if not path.is_file() or not (Path(run_dir) / MODEL_WEIGHTS).is_file():
        raise FmtlError(f"{run_dir} is not a run folder with a trained model ({MODEL_INFO} + {MODEL_WEIGHTS})")
    try:
        return RunInfo.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise FmtlError(f"{path} is damaged: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise FmtlError(f"{path} does not describe a model: {type(error).__name__}: {error}") from None


def load_model(run_dir: str | os.PathLike):
    """The trained model of a run folder (eval mode, CPU), its model.json and its InputSpec."""
    info = read_model_info(run_dir)
    model = create_model(info.architecture, info.num_classes, weights=None, head=info.head)
    model.load_state_dict(load_file(str(Path(run_dir) / MODEL_WEIGHTS)))
    model.flip_tta = info.flip_tta
    model.shift_tta = info.shift_tta
    return model.eval(), info, info.input_spec


def save_training_state(
    accelerator, run_dir: str | os.PathLike, trainer_state: dict, generators: dict[str, torch.Generator] | None = None
) -> None:
    """Save everything that decides the next batch (all processes call this).

    Accelerate's save_state writes the model, optimizer, scheduler and scaler; fmtl writes every
    process's random generators (python, numpy, torch, CUDA and ``generators``, e.g. augmentation
    and shuffling) to rng.json instead of Accelerate's pickles, and trainer.json with the epoch,
    history and a sha256 of every file. All of it goes to state.tmp, then is swapped in by renames,
    so an interrupted or failed save (a full disk) leaves the previous state whole.
    """
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / STATE_DIR, run_dir / f"{STATE_DIR}.tmp", run_dir / f"{STATE_DIR}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    rng = gather_object([rng_state(generators or {})])  # one entry per process, in process order
    try:
        with write_errors(tmp):
            accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for pickled in tmp.glob("random_states_*.pkl"):  # replaced by rng.json: never read back
                pickled.unlink()
            atomic_write_text(tmp / RNG_STATE, json.dumps({"processes": rng}))
            files = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            state = {**trainer_state, "step": accelerator.step, "num_processes": accelerator.num_processes}
            atomic_write_text(tmp / TRAINER_STATE, json.dumps({**state, "files": files}, indent=1))
            _swap_in(tmp, final, old)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()


def _swap_in(tmp: Path, final: Path, old: Path) -> None:
    """state.tmp becomes state; a crash between the two renames leaves state.old, which resume finds."""
    with write_errors(final):
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_training_state(run_dir: str | os.PathLike) -> Path:
    """The last complete state folder; ``state.old`` covers a crash between the two renames."""
    for name in (STATE_DIR, f"{STATE_DIR}.old"):
        candidate = Path(run_dir) / name
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    raise StateError(f"{run_dir} has no saved training state to resume from (was it run with --no-save-state?)")


def load_training_state(
    accelerator, run_dir: str | os.PathLike, generators: dict[str, torch.Generator] | None = None
) -> dict:
    """Restore what save_training_state saved, all of it or nothing: any file missing, damaged or
    refused stops the resume with a StateError naming it. Nothing is unpickled beyond torch's
    weights-only loader (Accelerate's optimizer/scheduler files) and safetensors/JSON (the rest)."""
    folder = find_training_state(run_dir)
    state = read_json(folder / TRAINER_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        raise StateError(f"{folder / TRAINER_STATE} lists no files: saved by an older fmtl, it cannot resume exactly")
    verify_files(folder, state["files"])
    if state.get("num_processes", 1) != accelerator.num_processes:
        raise StateError(f"{folder} was saved by {state.get('num_processes')} processes: resume it with as many "
                         f"(not {accelerator.num_processes})")  # fmt: skip
    try:
        accelerator.load_state(str(folder))
    except Exception as error:  # torch and safetensors raise assorted types for refused or damaged files
        raise StateError(f"cannot resume from {folder}: {one_line(error)}") from error
    restore_rng_state(folder / RNG_STATE, accelerator.process_index, generators or {})
    accelerator.step = state.get("step", 0)
    return state


def verify_files(folder: Path, files: dict[str, str]) -> None:
    """The folder holds exactly the files trainer.json lists, each with the sha256 it was saved with, before
    any is loaded: a file slipped in beside them (a pickle Accelerate would read) is refused too."""
    unlisted = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and f.name != TRAINER_STATE)
    unlisted = [name for name in unlisted if name not in files]
    if unlisted:
        raise StateError(f"{folder / unlisted[0]} is not in the state's sha256 manifest (trainer.json): "
                         "refusing to resume")  # fmt: skip
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise StateError(f"{path} is missing: the training state is incomplete")
        if sha256_file(path) != digest:
            raise StateError(f"{path} is not the file that was saved (damaged or replaced): refusing to resume")


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """This process's random generators as plain JSON values."""
    version, mt_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
        "generators": {key: g.get_state().tolist() for key, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(path: Path, process_index: int, generators: dict[str, torch.Generator]) -> None:
    """Set this process's generators from rng.json; a missing or malformed entry is a StateError."""
    try:
        state = read_json(path)["processes"][process_index]
        version, mt_state, gauss = state["python"]
        random.setstate((version, tuple(mt_state), gauss))
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if torch.cuda.is_available() and "cuda" in state:
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
        if set(state["generators"]) != set(generators):
            raise KeyError(f"generators {sorted(state['generators'])}, expected {sorted(generators)}")
        for key, generator in generators.items():
            generator.set_state(torch.tensor(state["generators"][key], dtype=torch.uint8))
    except StateError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise StateError(
            f"{path} does not hold this run's random state ({one_line(error)}): cannot resume exactly"
        ) from None


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"{path} is missing: the training state is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateError(f"{path} is damaged: {one_line(error)}") from None
