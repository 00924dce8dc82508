"""fmtl's default recipes, picked by the number of labelled training images.

What beats training from scratch depends on the data size (``benchmarks/accuracy.py`` measures it):
``few`` (under 2,000 images) leans on the pretrained features at a higher resolution, fine-tuning only
the last blocks on cached views; ``small`` fine-tunes everything gently with strong augmentation
(TrainConfig's plain defaults); ``large`` (10,000 and more) buys more epochs with a cheaper step and
flips only; ``scratch`` trains fmtl's ``scratch_cnn`` from random weights the speedrun way, and is what
``auto`` picks for small images (``SCRATCH_SIDE`` px or less, as Fashion-MNIST's 28) from ``SCRATCH_FROM``
training images on, where ImageNet features of upscaled thumbnails lose to a network trained at their own
size (``benchmarks/accuracy.py``). docs/training.md says why each value is what it is.

The recipes were tuned on EfficientNet-Lite0, whose backbone has 9 feature blocks; on another backbone
``--unfreeze last:N`` is scaled to its number of blocks, and ``--frozen-views`` is kept only where the
frozen blocks can run apart (a ``features`` sequence). A recipe only fills options nobody set (None in
TrainConfig): every option given on the command line, in ``--config`` or in a resumed run's config.yaml wins.
"""

from __future__ import annotations

import dataclasses
import math

from fmtl.training.config import FIELDS, TrainConfig, parse_budget, with_defaults
from fmtl.training.models import BackboneLayout, backbone_layout

PLAIN_MODEL = FIELDS["model"].metadata["plain"]  # the backbone transfer recipes were tuned on
RECIPES = ("auto", "few", "small", "large", "scratch")
FEW_BELOW = 2_000  # training images under which the few-images recipe is the default
LARGE_FROM = 10_000  # training images from which the large-data recipe is the default
TUNED_BLOCKS = 9  # the recipes' --unfreeze last:N counts EfficientNet-Lite0's 9 feature blocks
# Option -> value, over TrainConfig's plain defaults (which are the small-data recipe).
FEW = {"image_size": 128, "backbone_lr_scale": 0.3, "unfreeze": "last:5", "batch_size": 32}
VIEWS_PER_RECIPE = 4_000  # few: cached views of all images together, 4 to 16 per image (see few_views)
LARGE = {"image_size": 48, "unfreeze": "last:5", "augment_strength": 0.0, "backbone_lr_scale": 0.5}
# Training from scratch, the speedrun way (benchmarks/peers/speedrun_cnn.py): SGD with Nesterov momentum at a
# high rate, a long warm-up, label smoothing 0.2, flips and 2-pixel shifts, and test-time flips and shifts.
SCRATCH = {
    "model": "scratch_cnn", "weights": "none", "strategy": "finetune", "image_size": 0, "optimizer": "sgd",
    "lr": 0.4, "backbone_lr_scale": 1.0, "weight_decay": 5e-4, "warmup_fraction": 0.2, "label_smoothing": 0.2,
    "grad_clip": 0.0, "freeze_bn": False, "augment_strength": 0.7, "augment_warp": False, "shift_tta": True,
}  # fmt: skip
SCRATCH_SIDE = 32  # images this small or smaller (a side, in px) are where auto may train from scratch:
SCRATCH_FROM = 10_000  # from this many training images on,
SCRATCH_SHORT = (1_000, 120.0)  # or from this many when the budget is this many seconds or less
CHANGES = {"few": FEW, "small": {}, "large": LARGE, "scratch": SCRATCH}


def pick_recipe(n_train: int, image_side: int = 0, model_chosen: bool = True, budget_s: float = math.inf) -> str:
    """The recipe ``auto`` picks: by the images' number and, when no model was asked for, their side and
    the budget."""
    if not model_chosen and 0 < image_side <= SCRATCH_SIDE and scratch_wins(n_train, budget_s):
        return "scratch"
    return "few" if n_train < FEW_BELOW else "large" if n_train >= LARGE_FROM else "small"


def scratch_wins(n_train: int, budget_s: float) -> bool:
    """Where benchmarks/accuracy.py measured training from scratch ahead of transfer on small images."""
    return n_train >= SCRATCH_FROM or (n_train >= SCRATCH_SHORT[0] and budget_s <= SCRATCH_SHORT[1])


def scratch_batch(n_train: int) -> int:
    """The scratch recipe's batch: 512, but at least 8 steps an epoch (and 32 images a step)."""
    return min(512, max(32, n_train // 8))


def few_views(n_train: int) -> int:
    """Views per image for ``few``'s cache: more of them the fewer the images (each costs a forward pass
    through the frozen blocks)."""
    return min(16, max(4, VIEWS_PER_RECIPE // max(n_train, 1)))


def scaled_unfreeze(policy: str, layout: BackboneLayout) -> str | None:
    """A recipe's ``last:N`` (of Lite0's 9 blocks) for this backbone's blocks; None where it has no known blocks."""
    if not policy.startswith("last:"):
        return policy
    if not layout.blocks:
        return None
    return f"last:{max(1, round(int(policy[5:]) * layout.blocks / TUNED_BLOCKS))}"


def apply_recipe(
    cfg: TrainConfig, n_train: int, layout: BackboneLayout | None = None, image_side: int = 0
) -> tuple[TrainConfig, str]:
    """``cfg`` with the recipe's values for the options nobody set, the rest at their plain defaults, and a
    line saying what was picked. ``layout``: the backbone's (default: measured on its model); ``image_side``:
    the larger side of the training images (0: unknown)."""
    changed, line = _recipe_changes(cfg, n_train, layout, image_side)
    return with_defaults(changed), line


def _recipe_changes(
    cfg: TrainConfig, n_train: int, layout: BackboneLayout | None, image_side: int
) -> tuple[TrainConfig, str]:
    chosen = cfg.model is not None or cfg.weights is not None
    budget_s = parse_budget(cfg.budget) if cfg.budget else math.inf
    name = pick_recipe(n_train, image_side, chosen, budget_s) if cfg.recipe == "auto" else cfg.recipe
    untrained = cfg.weights is not None and cfg.weights.lower() == "none"
    if cfg.recipe == "auto" and (cfg.model == SCRATCH["model"] or untrained):
        name = "scratch"  # nothing pretrained to keep frozen or adapt gently
    if name == "scratch":
        return _scratch_changes(cfg, n_train, image_side, chosen)
    cfg = dataclasses.replace(cfg, model=cfg.model or PLAIN_MODEL)
    layout = layout or backbone_layout(cfg.model)
    recipe = {**CHANGES[name], **({"frozen_views": few_views(n_train)} if name == "few" else {})}
    if "unfreeze" in recipe and layout.blocks != TUNED_BLOCKS:
        recipe["unfreeze"] = scaled_unfreeze(recipe["unfreeze"], layout)
    if "frozen_views" in recipe and not (layout.sequential and recipe["unfreeze"]):
        del recipe["frozen_views"]  # the frozen blocks cannot run apart from the rest on this backbone
    changes = {key: value for key, value in recipe.items() if getattr(cfg, key) is None and value is not None}
    note = ""
    if "unfreeze" in recipe and cfg.unfreeze is None and layout.blocks != TUNED_BLOCKS:
        note = (f" [--unfreeze: last:5 of Lite0's {TUNED_BLOCKS} blocks scaled to {cfg.model}'s {layout.blocks}]"
                if layout.blocks else f" [{cfg.model} has no feature blocks fmtl knows: --unfreeze stays all]")  # fmt: skip
    bounds = {"few": f"< {FEW_BELOW:,}", "small": f"{FEW_BELOW:,} to {LARGE_FROM:,}", "large": f">= {LARGE_FROM:,}"}
    why = f"{n_train:,} training images" + (f", {bounds[name]}" if cfg.recipe == "auto" else ", as asked")
    shown = " ".join(_flag(key, value) for key, value in changes.items())
    line = f"recipe {name} ({why})" + (f": {shown}" if shown else "") + note
    return dataclasses.replace(cfg, recipe=name, **changes), line


def _scratch_changes(cfg: TrainConfig, n_train: int, image_side: int, chosen: bool) -> tuple[TrainConfig, str]:
    recipe = {**SCRATCH, "batch_size": scratch_batch(n_train)}
    if cfg.model not in (None, SCRATCH["model"]):  # another network from scratch: its own input size
        recipe = {key: value for key, value in recipe.items() if key not in ("model", "image_size")}
    changes = {key: value for key, value in recipe.items() if getattr(cfg, key) is None}
    if chosen or cfg.recipe == "scratch":
        why = "as asked" if cfg.recipe == "scratch" else "training from scratch"
    else:
        enough = (f"at least {SCRATCH_FROM:,}" if n_train >= SCRATCH_FROM
                  else f"at least {SCRATCH_SHORT[0]:,} in {SCRATCH_SHORT[1]:.0f} s or less")  # fmt: skip
        why = (f"{n_train:,} training images of {image_side} px: at most {SCRATCH_SIDE} px and {enough}, "
               "where training from scratch beats ImageNet transfer")  # fmt: skip
    shown = " ".join(_flag(key, value) for key, value in changes.items())
    return dataclasses.replace(cfg, recipe="scratch", **changes), f"recipe scratch ({why}): {shown}"


def _flag(key: str, value) -> str:
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"
