"""Test harness: fmtl's training with one real fault injected at a named point, then fmtl as usual.

    python tests/reliability/inject.py FAULT [FAULT ...] -- TRAIN OPTIONS
    accelerate launch tests/reliability/inject.py FAULT -- TRAIN OPTIONS

A FAULT is ``WHAT@WHERE#N`` (``#N``: the Nth time WHERE is reached, default 1), optionally
``...:rank=R`` to fault only on process R:

- ``kill@seconds#T``: SIGKILL this process T seconds after start (a random moment);
- ``kill@state-file#N``: SIGKILL inside Accelerate's save_state, before the Nth file it writes;
- ``kill@renames#N``: SIGKILL between the two renames that swap a saved state in (state -> state.old
  done, state.tmp -> state not yet), the Nth time;
- ``kill@publish#N``: SIGKILL just before the Nth atomic rename of a finished file (results.csv,
  model.safetensors, model.json, rng.json, trainer.json, ...);
- ``data-error@epoch#E``: a DataError at the first training batch of epoch E (an unreadable image, as a
  user meets it).

The faults are real (a real SIGKILL, a real exception); only where they strike is chosen.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def countdown(n: int):
    """A function that returns True the Nth time it is called."""
    calls = 0

    def tick() -> bool:
        nonlocal calls
        calls += 1
        return calls == n

    return tick


def install(fault: str) -> None:
    what_where, _, options = fault.partition(":")
    if options.startswith("rank=") and os.environ.get("RANK", "0") != options[5:]:
        return
    what, _, where_n = what_where.partition("@")
    where, _, n = where_n.partition("#")
    tick = countdown(int(float(n or 1)))
    if (what, where) == ("kill", "seconds"):
        threading.Timer(float(n), kill_now).start()
    elif (what, where) == ("kill", "state-file"):
        import accelerate.checkpointing as checkpointing

        original = checkpointing.save

        def save(*args, **kwargs):
            if tick():
                kill_now()
            return original(*args, **kwargs)

        checkpointing.save = save
    elif (what, where) in (("kill", "renames"), ("kill", "publish")):
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            renames = os.path.basename(os.fspath(dst)) == "state.old"
            if where == "publish" and not renames and os.path.basename(os.fspath(src)).startswith(".") and tick():
                kill_now()
            original_replace(src, dst, *args, **kwargs)
            if where == "renames" and renames and tick():
                kill_now()

        os.replace = replace
    elif (what, where) == ("data-error", "epoch"):
        from fmtl.errors import DataError
        from fmtl.training import loop

        original_epoch, original_step, armed = loop.Trainer.train_one_epoch, loop.Trainer.train_step, [False]

        def train_one_epoch(self, epoch, *args):
            armed[0] = epoch == int(float(n or 1))
            return original_epoch(self, epoch, *args)

        def train_step(self, indices, *args, **kwargs):
            if armed[0]:
                raise DataError(f"cannot decode image {int(indices[0])}: truncated file (injected on rank "
                                f"{os.environ.get('RANK', '0')})")  # fmt: skip
            return original_step(self, indices, *args, **kwargs)

        loop.Trainer.train_one_epoch, loop.Trainer.train_step = train_one_epoch, train_step
    else:
        raise SystemExit(f"inject.py: unknown fault {fault!r}")


def main() -> int:
    split = sys.argv.index("--")
    for fault in sys.argv[1:split]:
        install(fault)
    from fmtl.train import main as train_main

    return train_main(sys.argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
