"""What a run keeps of itself: the epoch history, the best model, the resumable state and its generators.

Every epoch's row goes to results.csv and the tracker; a better val accuracy saves the model (weights +
model.json); with --save-state the whole training state is saved too, with the plan in force and fmtl's
own random generators, so --resume continues the very run it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from fmtl.atomic import write_errors
from fmtl.errors import StateError, one_line
from fmtl.spec import RunInfo
from fmtl.training import reports
from fmtl.training.checkpoint import (
    MODEL_WEIGHTS,
    TRAINER_STATE,
    find_training_state,
    load_training_state,
    read_json,
    save_model,
    save_training_state,
)
from fmtl.training.plan import RunPlan


@dataclass
class EpochRow:
    """One epoch's record: a row of results.csv, a point of the curves, an entry of the saved state.

    The val fields are None for an epoch that did not validate (``--eval-every``)."""

    epoch: int
    phase: str
    train_loss: float
    val_loss: float | None
    val_acc: float | None
    val_top5: float | None
    val_images: int | None
    lr: float
    seconds: float
    images_per_s: float


class Recorder:
    """History, best model, saving and resuming for one run (every process holds one; the main one writes)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, generators: dict[str, torch.Generator],
                 save_state: bool, patience: int) -> None:  # fmt: skip
        self.accelerator, self.run_dir = accelerator, run_dir
        self.generators = generators  # fmtl's own random generators, saved and restored with the state
        self.save_state, self.patience = save_state, patience
        self.history: list[EpochRow] = []
        self.best = {"val_acc": -1.0, "epoch": 0}

    def record(self, row: EpochRow, net: torch.nn.Module, info: Callable[[dict], RunInfo], plan: RunPlan) -> None:
        """Record the epoch, keep the best model (``info(metrics)`` describes it), save the resumable state."""
        self.history.append(row)
        improved = row.val_acc is not None and row.val_acc > self.best["val_acc"]
        if improved:
            self.best = {"val_acc": row.val_acc, "val_top5": row.val_top5, "epoch": row.epoch}
        if self.accelerator.is_main_process:
            reports.write_results(self.run_dir, self.rows())
            if improved:
                with write_errors(self.run_dir / MODEL_WEIGHTS):
                    save_model(self.run_dir, net, info({"val": self.best}))
        self.accelerator.log({k: v for k, v in asdict(row).items() if k != "phase" and v is not None}, step=row.epoch)
        self.accelerator.print(_epoch_line(row, improved))
        if self.save_state:
            state = {"epoch": row.epoch, "history": self.rows(), "best": self.best, "plan": plan.saved()}
            save_training_state(self.accelerator, self.run_dir, state, self.generators)

    def save_position(self, plan: RunPlan, position: dict) -> None:
        """--save-every-steps: the resumable state inside an epoch, with where in it the run stands."""
        if self.save_state:
            state = {"epoch": position["epoch"] - 1, "history": self.rows(), "best": self.best, "plan": plan.saved(),
                     "position": position}  # fmt: skip
            save_training_state(self.accelerator, self.run_dir, state, self.generators)

    def rows(self) -> list[dict]:
        return [asdict(row) for row in self.history]

    def should_stop(self, epoch: int) -> bool:
        """--patience N: no better val accuracy for N epochs."""
        return bool(self.patience) and epoch - self.best["epoch"] >= self.patience

    def kept(self) -> str:
        """What a run that stops now leaves behind, for an error message."""
        return f"epoch {self.best['epoch']}'s model stays in {self.run_dir}" if self.best["epoch"] else "nothing saved"

    def resume(self) -> tuple[int, dict | None]:
        """Restore the last saved state (weights, optimizer, generators, history): the epoch to go on from, and
        the position inside it when the state was saved mid-epoch (else None)."""
        state = load_training_state(self.accelerator, self.run_dir, self.generators)
        self.history, self.best = [EpochRow(**row) for row in state["history"]], state["best"]
        position = state.get("position")
        where = (
            f"at step {position['step']} of epoch {position['epoch']}" if position else f"after epoch {state['epoch']}"
        )
        self.accelerator.print(f"resuming {self.run_dir} {where} (best val acc {self.best['val_acc']:.4f})")
        return state["epoch"] + 1, position


def saved_plan(run_dir: Path, steps_per_epoch: int, planned: RunPlan) -> RunPlan:
    """The plan the run's saved state was trained under (a budget run's re-plans included), else ``planned``.
    Read before the state is verified and loaded: it decides the model and optimizer the state must fit."""
    state = read_json(find_training_state(run_dir) / TRAINER_STATE)
    plan = state.get("plan") if isinstance(state, dict) else None
    if isinstance(plan, dict):
        try:
            return RunPlan(**plan, steps_per_epoch=steps_per_epoch)
        except TypeError as error:
            raise StateError(f"{run_dir} holds a saved plan fmtl cannot read ({one_line(error)})") from None
    total = state.get("total_steps") if isinstance(state, dict) else None  # states saved before "plan"
    return planned.with_total_steps(total) if isinstance(total, int) else planned


def _epoch_line(row: EpochRow, improved: bool) -> str:
    val = (
        f"val loss {row.val_loss:.4f}  val acc {row.val_acc:.4f}  top-5 {row.val_top5:.4f}"
        if row.val_acc is not None
        else "(not validated: --eval-every)"
    )
    return (
        f"epoch {row.epoch:>3} {row.phase:<8} train loss {row.train_loss:.4f}  {val}  "
        f"{row.seconds:.1f}s ({row.images_per_s:.0f} img/s){'  *' if improved else ''}"
    )
