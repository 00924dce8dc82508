"""fmtl's default recipes, picked by the number of labelled training images.

What beats training from scratch depends on the data size (``benchmarks/accuracy.py`` measures it):
``few`` (under 2,000 images) leans on the pretrained features at a higher resolution, fine-tuning only
the last blocks on cached views; ``small`` fine-tunes everything gently with strong augmentation
(TrainConfig's plain defaults); ``large`` (10,000 and more) buys more epochs with a cheaper step and
flips only. docs/training.md says why each value is what it is.

The recipes were tuned on EfficientNet-Lite0, whose backbone has 9 feature blocks; on another backbone
``--unfreeze last:N`` is scaled to its number of blocks, and ``--frozen-views`` is kept only where the
frozen blocks can run apart (a ``features`` sequence). A recipe only fills options nobody set (None in
TrainConfig): every option given on the command line, in ``--config`` or in a resumed run's config.yaml wins.
"""

from __future__ import annotations

import dataclasses

from fmtl.training.config import TrainConfig, with_defaults
from fmtl.training.models import BackboneLayout, backbone_layout

RECIPES = ("auto", "few", "small", "large")
FEW_BELOW = 2_000  # training images under which the few-images recipe is the default
LARGE_FROM = 10_000  # training images from which the large-data recipe is the default
TUNED_BLOCKS = 9  # the recipes' --unfreeze last:N counts EfficientNet-Lite0's 9 feature blocks
# Option -> value, over TrainConfig's plain defaults (which are the small-data recipe).
FEW = {"image_size": 128, "backbone_lr_scale": 0.3, "unfreeze": "last:5", "batch_size": 32}
VIEWS_PER_RECIPE = 4_000  # few: cached views of all images together, 4 to 16 per image (see few_views)
LARGE = {"image_size": 48, "unfreeze": "last:5", "augment_strength": 0.0, "backbone_lr_scale": 0.5}
CHANGES = {"few": FEW, "small": {}, "large": LARGE}


def pick_recipe(n_train: int) -> str:
    return "few" if n_train < FEW_BELOW else "large" if n_train >= LARGE_FROM else "small"


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


def apply_recipe(cfg: TrainConfig, n_train: int, layout: BackboneLayout | None = None) -> tuple[TrainConfig, str]:
    """``cfg`` with the recipe's values for the options nobody set, the rest at their plain defaults, and a
    line saying what was picked. ``layout``: the backbone's (default: measured on ``cfg.model``)."""
    changed, line = _recipe_changes(cfg, n_train, layout)
    return with_defaults(changed), line


def _recipe_changes(cfg: TrainConfig, n_train: int, layout: BackboneLayout | None) -> tuple[TrainConfig, str]:
    name = pick_recipe(n_train) if cfg.recipe == "auto" else cfg.recipe
    if str(cfg.weights).lower() == "none":  # nothing pretrained to keep frozen or adapt gently
        return cfg, "recipe: none (training from scratch: fmtl's plain defaults)"
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


def _flag(key: str, value) -> str:
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"
