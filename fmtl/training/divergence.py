"""Divergence is an error, not a result: a loss or weight that stops being finite ends the run with advice.

Every process stops at the same step (one rank's NaN is summed across ranks, so none waits at a hung
collective), and no non-finite weight gets past an epoch, so none is ever saved.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from fmtl.errors import DivergenceError


def check_loss(loss: torch.Tensor, accelerator: Accelerator, step_was_skipped: bool, where: str,
               advice: Callable[[], str]) -> None:  # fmt: skip
    """A DivergenceError once any process's loss is NaN or infinite. Under fp16 a step whose gradients overflowed
    was skipped by the scaler (``step_was_skipped``): not divergence. ``advice()`` ends the message."""
    if accelerator.scaler is not None and step_was_skipped:
        return
    value = loss.detach().float()
    bad = (~torch.isfinite(value)).float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if bad.item():
        what = "infinite" if torch.isinf(value) else "NaN"
        raise DivergenceError(f"loss became {what} at {where}; {advice()}")


@torch.no_grad()
def check_weights(net: torch.nn.Module, epoch: int, advice: Callable[[], str]) -> None:
    for name, parameter in net.named_parameters():
        if not torch.isfinite(parameter).all():
            raise DivergenceError(f"weights became NaN or infinite in epoch {epoch} ({name}); {advice()}")


def advice(cfg, kept: str) -> str:
    """What to change, and what the stopped run leaves behind (``kept``)."""
    clip = "" if cfg.grad_clip else " or clip gradients (--grad-clip 1)"
    return f"lower --lr (now {cfg.lr:g}, backbone x{cfg.backbone_lr_scale:g}){clip}; {kept}"
