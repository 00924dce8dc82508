"""What a run is built from, before its first step: the Accelerator, the splits, the model, the loaders,
the optimizer and its schedule.

Each is a function of the options (and the plan), so the loop, the budget's warm-up, the tests and the
benchmarks build them the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import accelerate.utils
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader

from fmtl.errors import ConfigError, FmtlError, MissingSplitError
from fmtl.spec import DataOptions, InputSpec
from fmtl.training.config import TrainConfig
from fmtl.training.data import ImageSet, load_run_split, load_run_splits, seeded_subset
from fmtl.training.models import FmtlModel, apply_freeze, create_model, parameter_groups
from fmtl.training.plan import Schedule

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class Splits:
    """The data one run trains, validates and tests on (a Trainer is built around these)."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    test_name: str  # "test", or the stand-in's name when the data has no test split


def launched_precision() -> str | None:
    """The precision an accelerate config or ``accelerate launch --mixed_precision`` chose, if any."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or None


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 runs natively on ``device``: a CPU with AMX or AVX512-BF16, a GPU that supports it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def check_precision(cfg: TrainConfig) -> None:
    """bf16 on a CPU without native support is emulated, hundreds of times slower than fp32: refused
    unless --force-bf16; fp16 needs a GPU."""
    precision = cfg.mixed_precision or launched_precision() or "no"
    if torch.cuda.is_available() or precision == "no":
        return
    if precision == "fp16":
        raise FmtlError("--mixed-precision fp16 needs a GPU; on a CPU use no (or bf16 where the CPU supports it)")
    if not cpu_has_native_bf16() and not cfg.force_bf16:
        raise FmtlError(
            "this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 would be emulated and far slower than fp32; "
            "use --mixed-precision no, or --force-bf16 to insist"
        )


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def check_trackers(log_with: str | None) -> None:
    """--log-with names trackers that are installed: Accelerate would only warn and log nowhere."""
    if log_with is None or log_with == "all":
        return
    for name in log_with.split(","):
        available = getattr(accelerate.utils, f"is_{name.strip()}_available", None)
        if available is None:
            raise ConfigError(f"--log-with {name!r} is not a tracker Accelerate knows: {', '.join(TRACKERS)} or all")
        if not available():
            raise ConfigError(f"--log-with {name}: the {name} package is not installed (pip install {name})")


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    check_precision(cfg)  # before Accelerate fixes the process-wide precision
    # A hybrid run's backbone gets no gradients in its head-only epochs: DDP must expect that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.strategy == "hybrid")
    return Accelerator(
        cpu=several_processes_without_gpu(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.log_with,
        project_dir=str(run_dir),
        kwargs_handlers=[ddp],
    )


def several_processes_without_gpu() -> bool:
    """Launched as several processes on a machine with no GPU (launch/cpu-multiprocess.yaml).

    Accelerate only picks its gloo MULTI_CPU mode when told the run is on the CPU; without
    this each process would train alone, unaware of the others.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.resume:
        return Path(cfg.resume)
    if cfg.output:
        return Path(cfg.output)
    data_name = Path(cfg.data).stem if cfg.data != "fashion-mnist" else "fashion-mnist"
    return Path("runs") / f"{cfg.model}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def data_options(cfg: TrainConfig) -> DataOptions:
    """How this run's splits are made: recorded in model.json, so export and evaluate reload the same images."""
    return DataOptions(
        source=cfg.data, test_source=cfg.test_data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
        seed=cfg.seed, source_size=cfg.source_size, max_eval_samples=cfg.max_test_samples or 0,
        max_val_samples=cfg.max_val_samples or 0,
    )  # fmt: skip


def load_splits(cfg: TrainConfig) -> Splits:
    """Train (optionally subset), val and test sets; the val split stands in when there is no test split."""
    options = data_options(cfg)
    train, val = load_run_splits(options)
    train = seeded_subset(train, cfg.max_train_samples, cfg.seed)
    try:
        test, test_name = load_run_split(options, "test"), "test"
    except MissingSplitError:
        test, test_name = val, "val (the data has no test split)"
    if len(val) == 0:
        raise FmtlError("the validation split is empty: raise --val-fraction or add more images")
    if test.classes != train.classes or test.size != train.size or test.channels != train.channels:
        raise FmtlError(f"the test data ({test.source}) does not match the training data's classes, size or channels")
    return Splits(train, val, test, test_name)


def input_spec(model: FmtlModel, data: ImageSet, cfg: TrainConfig) -> InputSpec:
    defaults = model.input_defaults
    return InputSpec(
        channels=data.channels,
        source_size=data.size,
        image_size=cfg.image_size or defaults.image_size,
        mean=defaults.mean,
        std=defaults.std,
        interpolation=defaults.interpolation,
        fit=data.fit,
    )


def build_model(cfg: TrainConfig, num_classes: int) -> FmtlModel:
    """The run's model, frozen as --strategy (the plan's, once settings are resolved) and --unfreeze say."""
    model = create_model(cfg.model, num_classes, weights=cfg.weights, head=cfg.head)
    apply_freeze(model, "frozen" if cfg.strategy == "linear" else cfg.unfreeze)
    model.flip_tta = cfg.flip if cfg.flip_tta is None else cfg.flip_tta
    model.shift_tta = model.flip_tta and bool(cfg.shift_tta)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def index_loader(n: int, batch_size: int) -> DataLoader:
    """Batches of indices ``0..n-1`` in order, for the passes without gradients (training's order is
    ``data.feeder.EpochSampler``'s)."""
    return DataLoader(range(n), batch_size=batch_size)


def make_optimizer(cfg: TrainConfig, model: FmtlModel, schedule: Schedule):
    """One optimizer and one scheduler for the whole run (all phases), so a resumed state always fits;
    the scheduler's factors follow ``schedule``'s plan, whichever plan is in force."""
    groups = parameter_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    factors = schedule.factors()
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [factors[g["part"]] for g in groups])
