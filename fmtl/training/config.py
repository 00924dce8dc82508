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
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fmtl.errors import ConfigError, FmtlError

STRATEGIES = ("linear", "finetune", "hybrid")
PRECISIONS = ("no", "fp16", "bf16")
HEADS = ("linear", "mlp")
RECIPE_NAMES = ("auto", "few", "small", "large", "scratch")


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


def option(default, help: str, plain=None, **extra):  # noqa: A002 - mirrors argparse's name
    """A TrainConfig field: its default, its ``--help`` line and, for a field a recipe may fill (default None),
    the ``plain`` value it takes when no recipe does."""
    return field(default=default, metadata={"help": help, "plain": plain, **extra})


# The options `fmtl train --help` shows first; the rest are listed under "advanced".
EVERYDAY = ("data", "model", "budget", "strategy", "image_size", "epochs", "batch_size", "lr", "output", "resume")
# Old option names that still work for one release (TrainConfig moves their values): old -> the new names.
DEPRECATED = {"max_eval_samples": ("max_val_samples", "max_test_samples")}


@dataclass
class TrainConfig:
    """Every training option. None means "unset": a recipe (``fmtl.training.recipe``) or the planner fills it,
    else the field's plain default (``with_defaults``)."""

    # data
    data: str = option("fashion-mnist", "fashion-mnist, a Kaggle-style CSV, or an image folder")
    test_data: str | None = option(None, "a separate test CSV or folder (else the source's own test split)")
    data_dir: str | None = option(
        None, "folder holding the Fashion-MNIST IDX files (else FMTL_DATA_DIR, Debian's, cache)"
    )
    source_size: int = option(224, "side that folder images of mixed sizes are stored at")
    val_fraction: float = option(0.1, "share of the training data held out for validation (stratified)")
    max_train_samples: int = option(0, "train on a seeded, stratified subset of this many images (0: all)")
    max_val_samples: int | None = option(
        None, "validate on a seeded, stratified subset of this many images (unset: all)"
    )
    max_test_samples: int | None = option(None, "test on a seeded, stratified subset of this many images (unset: all)")
    max_eval_samples: int | None = option(
        None, "deprecated, goes in the next release: sets --max-val-samples and --max-test-samples", deprecated=True
    )
    recipe: str = option(
        "auto", "defaults by data: auto (picks by the images' size and number), few, small, large or scratch"
    )
    # model
    model: str | None = option(
        None,
        "any torchvision classifier name, efficientnet_lite0 or scratch_cnn (unset: the recipe's)",
        plain="efficientnet_lite0",
    )
    weights: str | None = option(
        None, "DEFAULT, a torchvision weights name, a .pth/.safetensors file, or none", plain="DEFAULT"
    )
    head: str = option("linear", "new classification head: linear, or mlp (512 hidden, dropout 0.5)")
    image_size: int | None = option(
        None, "side the backbone sees; cost grows with its square (0: the weights' own)", plain=64
    )
    # strategy
    strategy: str | None = option(
        None, "linear (frozen backbone), finetune (all), hybrid (head first, then unfreeze)", plain="hybrid"
    )
    head_epochs: int = option(1, "hybrid: epochs training the head alone before the backbone unfreezes")
    unfreeze: str | None = option(
        None, "what fine-tuning trains besides the head: all, or last:N feature blocks", plain="all"
    )
    freeze_bn: bool | None = option(
        None, "fine-tune with BatchNorm in inference mode, so features don't jump on unfreezing", plain=True
    )
    head_cache: bool = option(True, "head-only epochs train on cached features of un-augmented images (cheap)")
    head_fit: str = option("lbfgs", "cached head phase: first solve the linear head by L-BFGS (lbfgs), or not (none)")
    frozen_views: int | None = option(
        None,
        "with --unfreeze last:N: run the frozen blocks once on this many views of each image (the first plain, "
        "the rest augmented) and fine-tune on those; 0: run them every step on fresh augmentations",
        plain=0,
    )
    # optimisation
    epochs: int = option(3, "total epochs, all phases together (with --budget: the planner's)")
    max_steps: int | None = option(
        None, "end after this many optimizer steps, the last epoch cut short (unset: --epochs decides)"
    )
    budget: str | None = option(None, "train within this wall time (90s, 10m, 1h): epochs planned from measured speed")
    batch_size: int | None = option(None, "images per step per process", plain=128)
    eval_batch_size: int = option(
        0, "images per step for validation, test and feature caching (0: 64 on a CPU, 256 on an accelerator)"
    )
    lr: float | None = option(None, "head learning rate (peak of the schedule)", plain=1e-3)
    backbone_lr_scale: float | None = option(None, "backbone learning rate = lr x this, when it trains", plain=0.1)
    optimizer: str | None = option(None, "adamw or sgd (momentum 0.9, nesterov)", plain="adamw")
    weight_decay: float | None = option(
        None, "weight decay, not on biases and norm weights (adamw: decoupled; sgd: L2)", plain=0.01
    )
    warmup_fraction: float | None = option(
        None, "share of each phase's steps spent warming the learning rate up", plain=0.05
    )
    label_smoothing: float | None = option(None, "cross-entropy label smoothing", plain=0.1)
    grad_clip: float | None = option(None, "clip gradient norm to this (0: off)", plain=1.0)
    gradient_accumulation_steps: int = option(1, "optimizer step every N batches")
    patience: int = option(0, "stop after this many epochs without a better val accuracy (0: never)")
    eval_every: int | None = option(
        None, "validate every N fine-tuning epochs and at each phase's end (unset: 1, or the planner's under --budget)"
    )
    calibrate: bool = option(True, "fit a temperature on validation at the end of training")
    augment: bool = option(True, "random flip, rotation, translation, scale, brightness/contrast")
    augment_strength: float | None = option(
        None, "scales rotation (15 deg), translation (0.1 of the side), scale and brightness/contrast", plain=1.0
    )
    augment_warp: bool | None = option(
        None, "besides flips and shifts, rotate, scale and change brightness/contrast", plain=True
    )
    flip: bool = option(True, "random horizontal flips (turn off for text, digits, anything with a handedness)")
    flip_tta: bool | None = option(
        None, "evaluate, and export, the mean of each image's and its mirror's logits (unset: on when --flip is)"
    )
    shift_tta: bool | None = option(
        None, "with flip TTA, also average 1-pixel shifts of both views (6 in all; in the export too)", plain=False
    )
    seed: int = option(0, "seeds the split, subset, initialisation, shuffling and augmentation")
    # hardware
    mixed_precision: str | None = option(
        None, "no, fp16 or bf16 (unset: the accelerate config's; bf16 needs native support)"
    )
    force_bf16: bool = option(False, "allow bf16 on a CPU without native bf16 (slow: emulated)")
    channels_last: bool = option(True, "channels_last memory format for conv backbones")
    threads: int = option(0, "torch intra-op threads per process (0: torch's default)")
    workers: int = option(-1, "DataLoader workers reading batches from a folder's store (-1: 0 on a CPU, 4 a GPU)")
    keep_freed_memory: bool = option(True, "CPU + glibc: keep freed memory in the process (no per-batch page faults)")
    # output
    output: str | None = option(None, "run folder (default runs/<model>-<data>-<time>)")
    resume: str | None = option(None, "continue the run in this folder from its last completed epoch")
    log_with: str | None = option(None, "Accelerate tracker: tensorboard, wandb, mlflow, comet_ml, aim, all")
    save_state: bool = option(True, "save the full training state each epoch, so --resume can continue")
    save_every_steps: int = option(0, "also save the state every N steps, so --resume continues mid-epoch (0: off)")
    quiet: bool = option(False, "no progress bars")

    def __post_init__(self) -> None:
        if self.max_eval_samples is not None:  # the deprecated name: its 0 meant all
            self.max_val_samples = self.max_val_samples if self.max_val_samples is not None else self.max_eval_samples
            self.max_test_samples = (
                self.max_test_samples if self.max_test_samples is not None else self.max_eval_samples
            )
            self.max_eval_samples = None

    def validate(self) -> None:
        if _given(self, "strategy"):
            _choice("strategy", self.strategy, STRATEGIES)
        _choice("recipe", self.recipe, RECIPE_NAMES)
        if self.mixed_precision is not None:
            _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        if _given(self, "optimizer"):
            _choice("optimizer", self.optimizer, ("adamw", "sgd"))
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "eval_every"):
            if _given(self, name) and getattr(self, name) < 1:
                raise FmtlError(f"--{name.replace('_', '-')} must be at least 1")
        if self.eval_batch_size < 0:
            raise FmtlError("--eval-batch-size must be 0 (the device's default) or positive")
        for name in ("max_steps", "max_train_samples", "max_val_samples", "max_test_samples", "frozen_views"):
            if _given(self, name) and getattr(self, name) < 0:
                raise FmtlError(f"--{name.replace('_', '-')} must be 0 (off) or positive")
        if _given(self, "augment_strength") and not 0 <= self.augment_strength <= 3:
            raise FmtlError("--augment-strength must be between 0 (flips only) and 3")
        if _given(self, "lr") and self.lr <= 0:
            raise FmtlError("--lr must be positive")
        if self.budget is not None:
            parse_budget(self.budget)
        check_head_epochs(self)
        # Checked here, before a run folder or an Accelerator exists, not when the model is built.
        _choice("head", self.head, HEADS)
        _choice("head_fit", self.head_fit, ("lbfgs", "none"))
        if _given(self, "unfreeze") and self.unfreeze != "all" and not _is_last_n(self.unfreeze):
            raise ConfigError(f"--unfreeze {self.unfreeze!r} is not all or last:N (N >= 1)")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def check_head_epochs(cfg: TrainConfig) -> None:
    """A hybrid run's head epochs leave it fine-tuning epochs (under --budget the planner sets the epochs).
    Checked on the options and again once the recipe has picked the strategy."""
    if cfg.strategy == "hybrid" and not 0 < cfg.head_epochs < (cfg.epochs if cfg.budget is None else math.inf):
        raise FmtlError(f"hybrid needs 0 < --head-epochs < --epochs (got {cfg.head_epochs} of {cfg.epochs})")


def _given(cfg: TrainConfig, name: str) -> bool:
    return getattr(cfg, name) is not None


def with_defaults(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every option a recipe may fill that is still unset at its plain default."""
    plain = {f.name: f.metadata["plain"] for f in dataclasses.fields(cfg) if f.metadata.get("plain") is not None}
    missing = {name: value for name, value in plain.items() if getattr(cfg, name) is None}
    return dataclasses.replace(cfg, **missing) if missing else cfg


# --eval-batch-size 0: images per pass without gradients, by device type. On a CPU an image costs more in
# large batches (their activations outgrow the caches); accelerators want large batches.
EVAL_BATCH = {"cpu": 64}
EVAL_BATCH_ACCELERATOR = 256


def with_eval_batch(cfg: TrainConfig, device_type: str) -> TrainConfig:
    """``cfg`` with --eval-batch-size 0 resolved for the device it runs on."""
    if cfg.eval_batch_size:
        return cfg
    return dataclasses.replace(cfg, eval_batch_size=EVAL_BATCH.get(device_type, EVAL_BATCH_ACCELERATOR))


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
    """Every TrainConfig field as ``--option``: the everyday ones first, the rest under "advanced"."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [--data DATA] [--model MODEL] [--budget 10m | --epochs N] [OPTIONS]",
        description="Fine-tune a pretrained CNN on your classes.",
        allow_abbrev=False,
    )
    everyday = parser.add_argument_group("everyday options")
    advanced = parser.add_argument_group("advanced options")
    everyday.add_argument("--config", help="YAML file of options (the command line overrides it)")
    for name in EVERYDAY:
        _add_option(everyday, FIELDS[name])
    for f in dataclasses.fields(TrainConfig):
        if f.name not in EVERYDAY:
            _add_option(advanced, f)
    return parser


def _add_option(group, f: dataclasses.Field) -> None:
    kinds = str(f.type).replace(" ", "").split("|")
    kind = {"bool": None, "int": int, "float": float}.get(kinds[0], str)
    extra = {"action": argparse.BooleanOptionalAction} if kinds[0] == "bool" else {"type": kind}
    plain = f.metadata.get("plain")
    shown = (
        f.default if f.default is not None else ("the recipe's, else " + str(plain) if plain is not None else "unset")
    )
    shown = argparse.SUPPRESS if f.metadata.get("deprecated") else f"{f.metadata['help']} [{shown}]"
    group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS, help=shown, **extra)


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
    for old, new in DEPRECATED.items():
        if old in values:
            news = " ".join(f"--{name.replace('_', '-')} N" for name in new)
            print(f"fmtl: note: --{old.replace('_', '-')} is deprecated and goes in the next release: use {news}",
                  file=sys.stderr)  # fmt: skip
    config = TrainConfig(**values)
    config.validate()
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
    for kind in (k for k in kinds if k != "None"):  # the value is not null: None is no type it can have
        accepted = _YAML_TYPES.get(kind)
        if accepted is None:  # a type this check does not know (a list, say): leave it to validate()
            return value
        if isinstance(value, accepted) and not (isinstance(value, bool) and kind != "bool"):
            return float(value) if kind == "float" else value
    wanted = " or ".join(k for k in kinds if k != "None")
    raise ConfigError(f"{path}: {key} must be {wanted}, got {value!r} ({type(value).__name__})")
