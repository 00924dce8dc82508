"""fmtl's default recipe, picked by the number of labelled training images.

What wins against training from scratch depends on the data size (``benchmarks/accuracy.py``
measures it). With a few labelled images per class, the pretrained features do most of the work, and
they are much better at a resolution nearer ImageNet's: a solved linear probe on 100 Fashion-MNIST
images scored 65 % at 64 px, 69 % at 128 and 72 % at 160, and on 1,000 images 79, 82 and 83 %. A few
hundred images make a 128 px fine-tuning epoch affordable, so ``few`` trains at 128 px, with a
backbone learning rate 0.3x the head's (0.1x lost about a point: 74.2 against 75.2 % at 10 per class
after 25 steps, 83.8 against 84.8 % at 100 after 48, means of 3 seeded subsets). It also keeps the
first 4 of Lite0's 9 feature blocks frozen and computes their outputs once, for 4 to 16 views of
each image (``--frozen-views``, more the fewer the images), so a fine-tuning step runs only the last
5 blocks. Batches of 32 instead of 128 give four times the steps for about 15 % more time per epoch:
at equal epochs, on a GPU, val accuracy rose from 86.2 to 87.6 % at 100 per class and from 77.8 to
78.9 % at 10 (means of 3 seeded subsets; batches of 64 gave 87.6 and 78.2 %). Training the last 5
blocks instead of 3 costs 2.2x a step here (0.29 against 0.13 s), so it gets half the epochs; at
those epochs it still raised val accuracy, from 87.6 to 88.0 % at 100 per class and from 78.9 to
79.6 % at 10 (``benchmarks/experiments/results/few-regularize.md``, which also has what did not
help: mixup, weight averaging, 8 views). With a few thousand images, ``small`` fine-tunes everything
gently at 64 px, frozen BatchNorm, strong augmentation. With ten thousand and more, a budget buys
only a few epochs, and what decides is how many: ``large`` fine-tunes more cheaply (48 px, the first
feature blocks frozen) with a larger backbone learning rate. On 10,000 images (1,000 a class) in 300 s
it reached 91.9 % val accuracy against ``small``'s 88.9 % (8.2 fine-tuning epochs against 4.4). In the
few epochs a budget buys there, augmentation only slows learning down, so ``large`` flips images and
nothing more (``--augment-strength 0``): on all 54,000 images at the epochs ``make demo``'s 900 s buy,
val 93.92 % against 93.58 at strength 0.25 and 93.26 at 0.5 (2 seeds each, the same epochs:
``benchmarks/experiments/results/large-budget.md``, which also has the resolutions, depths and the
head phase that did not help); on 10,000 images in 300 s on this CPU, val 92.55 and 92.15 % against
91.90 and 91.35 at 0.5 (2 seeded subsets, all 6,000 val images).

``--recipe auto`` (the default) picks by the number of training images; ``few``, ``small`` or
``large`` force one. A recipe only supplies defaults: every option given on the command line or in
``--config`` wins. The picked recipe is printed and saved in config.yaml.
"""

from __future__ import annotations

import dataclasses

from fmtl.training.config import TrainConfig

RECIPES = ("auto", "few", "small", "large")
FEW_BELOW = 2_000  # training images under which the few-images recipe is the default
LARGE_FROM = 10_000  # training images from which the large-data recipe is the default (measured: 10,000 and 54,000)
# Option -> value, over TrainConfig's own defaults (which are the small-data recipe).
FEW = {"image_size": 128, "backbone_lr_scale": 0.3, "unfreeze": "last:5", "batch_size": 32}
VIEWS_PER_RECIPE = 4_000  # few: cached views of all images together, 4 to 16 per image (see few_views)
LARGE = {
    "image_size": 48,
    "unfreeze": "last:5",
    "augment_strength": 0.0,
    "backbone_lr_scale": 0.5,
}
CHANGES = {"few": FEW, "small": {}, "large": LARGE}


def pick_recipe(n_train: int) -> str:
    return "few" if n_train < FEW_BELOW else "large" if n_train >= LARGE_FROM else "small"


def few_views(n_train: int) -> int:
    """Views per image for ``few``'s cache: more of them the fewer the images (each costs a forward pass
    through the frozen blocks; at 1,000 images 4 views took ~15 s here, 16 views of 100 images ~5 s)."""
    return min(16, max(4, VIEWS_PER_RECIPE // max(n_train, 1)))


def apply_recipe(cfg: TrainConfig, n_train: int) -> tuple[TrainConfig, str]:
    """``cfg`` with the recipe's defaults for the options nobody set, and a line saying what was picked.

    Options count as set when ``load_config`` saw them (command line, ``--config``, a resumed run's
    config.yaml); a TrainConfig built in code has every option set.
    """
    name = pick_recipe(n_train) if cfg.recipe == "auto" else cfg.recipe
    if str(cfg.weights).lower() == "none":  # nothing pretrained to keep frozen or adapt gently
        return cfg, "recipe: none (training from scratch: fmtl's plain defaults)"
    given = getattr(cfg, "given", None)
    given = set(given) if given is not None else {f.name for f in dataclasses.fields(cfg)}
    recipe = {**CHANGES[name], **({"frozen_views": few_views(n_train)} if name == "few" else {})}
    changes = {key: value for key, value in recipe.items() if key not in given}
    bounds = {"few": f"< {FEW_BELOW:,}", "small": f"{FEW_BELOW:,} to {LARGE_FROM:,}", "large": f">= {LARGE_FROM:,}"}
    why = f"{n_train:,} training images" + (f", {bounds[name]}" if cfg.recipe == "auto" else ", as asked")
    shown = " ".join(_flag(key, value) for key, value in changes.items())
    line = f"recipe {name} ({why})" + (f": {shown}" if shown else "")
    resolved = dataclasses.replace(cfg, recipe=name, **changes)
    if hasattr(cfg, "given"):  # not a field: replace() drops it, and the planner still needs it (--eval-every)
        resolved.given = cfg.given
    return resolved, line


def _flag(key: str, value) -> str:
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"
