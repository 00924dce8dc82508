"""Training options: dataclass defaults, then an optional YAML file, then the command line.

Every field of ``TrainConfig`` is one ``--option`` (underscores become dashes, booleans get
``--x/--no-x``), its help text is the comment beside the default, and the resolved
config is saved in the run folder as ``config.yaml``. Unknown keys, in a file or on the
command line, are rejected with the closest valid name.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fmtl.errors import ConfigError, FmtlError

STRATEGIES = ("linear", "finetune", "hybrid")
PRECISIONS = ("no", "fp16", "bf16")
HEADS = ("linear", "mlp")


UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
BUDGET_PATTERN = re.compile(r"(\d+(?:\.\d+)?)([hms]?)")


def parse_budget(text: str) -> float:
    """``"90s"``, ``"10m"``, ``"1h"``, ``"1h30m"`` or plain seconds ``"600"`` -> seconds."""
    cleaned = str(text).strip().lower().replace(" ", "")
    parts = BUDGET_PATTERN.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise ConfigError(f"--budget {text!r} is not a duration: use e.g. 90s, 10m, 1h or 1h30m")
    seconds = sum(float(number) * UNITS[unit or "s"] for number, unit in parts)
    if seconds <= 0:
        raise ConfigError("--budget must be longer than zero")
    return seconds



def option(default, help: str, **extra):  # noqa: A002 - mirrors argparse's name
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # data
    data: str = option("fashion-mnist", "fashion-mnist, a Kaggle-style CSV, or an image folder")
    test_data: str | None = option(None, "a separate test CSV or folder (else the source's own test split)")
    data_dir: str | None = option(
        None, "folder holding the Fashion-MNIST IDX files (else FMTL_DATA_DIR, Debian's, cache)"
    )
    source_size: int = option(224, "side that folder images of mixed sizes are stored at")
    val_fraction: float = option(0.1, "share of the training data held out for validation (stratified)")
    max_train_samples: int = option(0, "train on a seeded, stratified subset of this many images (0: all)")
    max_eval_samples: int = option(0, "validate and test on seeded, stratified subsets of this size (0: all)")
    max_val_samples: int = option(
        0, "validate on a seeded, stratified subset of this size (0: --max-eval-samples decides); the test set stays"
    )
    recipe: str = option("auto", "defaults by data size: auto (picks by training images), few, small or large")
    # model
    model: str = option("efficientnet_lite0", "any torchvision classifier name, or efficientnet_lite0")
    weights: str = option("DEFAULT", "DEFAULT, a torchvision weights name, a .pth/.safetensors file, or none")
    head: str = option("linear", "new classification head: linear, or mlp (512 hidden, dropout 0.5)")
    image_size: int = option(64, "side the backbone sees; cost grows with its square (0: the weights' own)")
    # strategy
    strategy: str = option("hybrid", "linear (frozen backbone), finetune (all), hybrid (head first, then unfreeze)")
    head_epochs: int = option(1, "hybrid: epochs training the head alone before the backbone unfreezes")
    unfreeze: str = option("all", "what fine-tuning trains besides the head: all, or last:N feature blocks")
    freeze_bn: bool = option(True, "fine-tune with BatchNorm in inference mode, so features don't jump on unfreezing")
    head_cache: bool = option(True, "head-only epochs train on cached features of un-augmented images (cheap)")
    head_fit: str = option("lbfgs", "cached head phase: first solve the linear head by L-BFGS (lbfgs), or not (none)")
    frozen_views: int = option(
        0,
        "with --unfreeze last:N: run the frozen blocks once on this many views of each image (the first plain, "
        "the rest augmented) and fine-tune on those; 0: run them every step on fresh augmentations",
    )
    # optimisation
    epochs: int = option(3, "total epochs, all phases together")
    max_steps: int = option(0, "end after this many optimizer steps, the last epoch cut short (0: --epochs decides)")
    budget: str | None = option(None, "train within this wall time (90s, 10m, 1h): epochs planned from measured speed")
    batch_size: int = option(128, "images per step per process")
    eval_batch_size: int = option(
        0, "images per step for validation, test and feature caching (0: 64 on a CPU, 256 on an accelerator)"
    )
    lr: float = option(1e-3, "head learning rate (peak of the schedule)")
    backbone_lr_scale: float = option(0.1, "backbone learning rate = lr x this, when it trains")
    optimizer: str = option("adamw", "adamw or sgd (momentum 0.9, nesterov)")
    weight_decay: float = option(0.01, "decoupled weight decay (not on biases and norm weights)")
    warmup_fraction: float = option(0.05, "share of each phase's steps spent warming the learning rate up")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    mixup: float = option(
        0.0, "train on mixtures of two examples and their labels, weights drawn from Beta(a, a) (0: off)"
    )
    grad_clip: float = option(1.0, "clip gradient norm to this (0: off)")
    gradient_accumulation_steps: int = option(1, "optimizer step every N batches")
    patience: int = option(0, "stop after this many epochs without a better val accuracy (0: never)")
    eval_every: int = option(
        1, "validate every N fine-tuning epochs and at each phase's end (with --budget: the planner's unless set)"
    )
    augment: bool = option(True, "random flip, rotation, translation, scale, brightness/contrast")
    augment_strength: float = option(
        1.0, "scales rotation (15 deg), translation (0.1 of the side), scale and brightness/contrast"
    )
    flip: bool = option(True, "random horizontal flips (turn off for text, digits, anything with a handedness)")
    flip_tta: bool = option(True, "with --flip: evaluate, and export, the mean of each image's and its mirror's logits")
    seed: int = option(0, "seeds the split, subset, initialisation, shuffling and augmentation")
    # hardware
    mixed_precision: str | None = option(
        None, "no, fp16 or bf16 (unset: the accelerate config's; bf16 needs native support)"
    )
    force_bf16: bool = option(False, "allow bf16 on a CPU without native bf16 (slow: emulated)")
    channels_last: bool = option(True, "channels_last memory format for conv backbones")
    threads: int = option(0, "torch intra-op threads per process (0: torch's default)")
    keep_freed_memory: bool = option(True, "CPU + glibc: keep freed memory in the process (no per-batch page faults)")
    # output
    output: str | None = option(None, "run folder (default runs/<model>-<data>-<time>)")
    resume: str | None = option(None, "continue the run in this folder from its last completed epoch")
    log_with: str | None = option(None, "Accelerate tracker: tensorboard, wandb, mlflow, comet_ml, aim, all")
    save_state: bool = option(True, "save the full training state each epoch, so --resume can continue")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("recipe", self.recipe, ("auto", "few", "small", "large"))
        if self.mixed_precision is not None:
            _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("optimizer", self.optimizer, ("adamw", "sgd"))
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise FmtlError(f"--{name.replace('_', '-')} must be at least 1")
        if self.eval_batch_size < 0:
            raise FmtlError("--eval-batch-size must be 0 (the device's default) or positive")
        for name in ("max_steps", "max_train_samples", "max_eval_samples", "max_val_samples", "frozen_views"):
            if getattr(self, name) < 0:
                raise FmtlError(f"--{name.replace('_', '-')} must be 0 (off) or positive")
        if not 0 <= self.augment_strength <= 3:
            raise FmtlError("--augment-strength must be between 0 (flips only) and 3")
        if self.lr <= 0:
            raise FmtlError("--lr must be positive")
        if not 0 <= self.mixup <= 10:
            raise FmtlError("--mixup must be between 0 (off) and 10 (the Beta distribution's a)")
        if self.budget is not None:
            parse_budget(self.budget)
        # With --budget the planner sets --epochs; only the head epochs must make sense.
        if self.strategy == "hybrid" and not 0 < self.head_epochs < (self.epochs if self.budget is None else math.inf):
            raise FmtlError(f"hybrid needs 0 < --head-epochs < --epochs (got {self.head_epochs} of {self.epochs})")
        # Checked here, before a run folder or an Accelerator exists, not when the model is built.
        _choice("head", self.head, HEADS)
        _choice("head_fit", self.head_fit, ("lbfgs", "none"))
        if self.unfreeze != "all" and not _is_last_n(self.unfreeze):
            raise ConfigError(f"--unfreeze {self.unfreeze!r} is not all or last:N (N >= 1)")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# --eval-batch-size 0: images per pass without gradients, by device type. On the 2-core CPU here a 128 px
# Lite0 pass with flip averaging cost about 10 ms an image in batches of 32 to 64, 13 in batches of 256 and
# 33 to 41 in batches of 512 (its activations outgrow the caches); accelerators want large batches.
EVAL_BATCH = {"cpu": 64}
EVAL_BATCH_ACCELERATOR = 256


def with_eval_batch(cfg: TrainConfig, device_type: str) -> TrainConfig:
    """``cfg`` with --eval-batch-size 0 resolved for the device it runs on (``given`` kept: the planner reads it)."""
    if cfg.eval_batch_size:
        return cfg
    resolved = dataclasses.replace(cfg, eval_batch_size=EVAL_BATCH.get(device_type, EVAL_BATCH_ACCELERATOR))
    if hasattr(cfg, "given"):
        resolved.given = cfg.given
    return resolved


def _is_last_n(policy: str) -> bool:
    return policy.startswith("last:") and policy[5:].isdigit() and int(policy[5:]) >= 1


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FmtlError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(choices)}")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def closest(key: str, prefix: str = "") -> str:
    """``"; did you mean --epochs?"`` for a near-miss of a TrainConfig field, else ``""``."""
    match = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1)
    if not match:
        return ""
    name = match[0].replace("_", "-") if prefix else match[0]
    return f"; did you mean {prefix}{name}?"


def build_parser(prog: str = "fmtl train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune a pretrained CNN on your classes.", allow_abbrev=False
    )
    parser.add_argument("--config", help="YAML file of options (the command line overrides it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"bool": None, "int": int, "float": float}.get(str(f.type), str)
        extra = {"action": argparse.BooleanOptionalAction} if f.type in ("bool", bool) else {"type": kind}
        parser.add_argument(
            flag, dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} [{f.default}]", **extra
        )
    return parser


def load_config(argv: list[str] | None = None, prog: str = "fmtl train") -> TrainConfig:
    """Defaults, then ``--config FILE`` (or a resumed run's config.yaml), then the command line."""
    parser = build_parser(prog)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next(u for u in unknown if u.startswith("-")) if any(u.startswith("-") for u in unknown) else unknown[0]
        raise FmtlError(f"unknown option {flag}{closest(flag.lstrip('-').split('=')[0], prefix='--')}")
    given = vars(args)
    values: dict = {}
    resume = given.get("resume")
    if resume:
        values.update(read_yaml(Path(resume) / "config.yaml"))
    if given.get("config"):
        values.update(read_yaml(Path(given.pop("config"))))
    given.pop("config", None)
    values.update(given)
    config = TrainConfig(**values)
    config.validate()
    config.given = frozenset(values)  # what the user set: the recipe (fmtl.training.recipe) fills in the rest
    return config


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FmtlError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise FmtlError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise FmtlError(f"{path} must hold a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    for key in values:
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown key {key!r}{closest(key)}")
    return {key: checked_value(key, value, path) for key, value in values.items()}


# TrainConfig's annotations (strings, under `from __future__ import annotations`) -> accepted YAML types
_YAML_TYPES = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,)}


def checked_value(key: str, value, path: Path):
    """``value`` from a YAML file if it has the type TrainConfig declares for ``key`` (an int is a
    float too; ``null`` only where the default may be None), else a ConfigError naming both."""
    declared = str(FIELDS[key].type).replace(" ", "")
    kinds = declared.split("|")
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{path}: {key} must be {kinds[0]}, got null")
    for kind in kinds:
        accepted = _YAML_TYPES.get(kind)
        if accepted is None:  # a type this check does not know (a list, say): leave it to validate()
            return value
        if isinstance(value, accepted) and not (isinstance(value, bool) and kind != "bool"):
            return float(value) if kind == "float" else value
    wanted = " or ".join(k for k in kinds if k != "None")
    raise ConfigError(f"{path}: {key} must be {wanted}, got {value!r} ({type(value).__name__})")
