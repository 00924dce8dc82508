"""The saved training state: resume loads exactly the files its sha256 manifest names, nothing else."""

from __future__ import annotations

import pickle

import pytest
import torch
from accelerate import Accelerator

from fmtl.errors import StateError
from fmtl.training.checkpoint import load_training_state, save_training_state


def _saved_state(run_dir) -> Accelerator:
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    save_training_state(accelerator, run_dir, {"epoch": 1, "history": []})
    return accelerator


def test_resume_refuses_a_file_the_manifest_does_not_name(tmp_path) -> None:
    accelerator = _saved_state(tmp_path)
    assert load_training_state(accelerator, tmp_path)["epoch"] == 1  # the state as saved resumes
    # a pickle Accelerate's load_state would read, slipped in beside the listed files
    (tmp_path / "state" / "random_states_0.pkl").write_bytes(pickle.dumps({"not": "saved by fmtl"}))
    with pytest.raises(StateError, match=r"random_states_0\.pkl is not in the state's sha256 manifest"):
        load_training_state(accelerator, tmp_path)


def test_resume_refuses_an_unlisted_file_in_a_subfolder(tmp_path) -> None:
    accelerator = _saved_state(tmp_path)
    (tmp_path / "state" / "extra").mkdir()
    (tmp_path / "state" / "extra" / "model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(StateError, match=r"extra/model\.bin is not in the state's sha256 manifest"):
        load_training_state(accelerator, tmp_path)
