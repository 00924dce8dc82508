"""The training entry point: ``accelerate launch fmtl/train.py [OPTIONS]``.

    accelerate launch fmtl/train.py --model efficientnet_lite0 --data fashion-mnist
    python -m fmtl.train [OPTIONS]          # the same, one process
    fmtl train [OPTIONS]                    # the same, through the CLI

A run is put together in ``fmtl.training.run`` and its loop lives in ``fmtl.training.loop``; this file is
the process entry point (the only ``main``), so the process-wide settings (glibc's allocator) are made here
and nowhere in library code.
"""

from __future__ import annotations

import ctypes
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file, Python puts fmtl/ itself first on sys.path, where fmtl's subpackages could
    # shadow other modules; put the folder holding the fmtl package there instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """On a CPU with glibc, keep freed memory in the process instead of handing it back each batch.

    By default every batch's activations (about 1 GB for ResNet-18 at 224 px, batch 64) are fresh
    mmap'ed pages that the kernel faults in and zeroes, then takes back; kept, they are reused
    (benchmarks/train_throughput.py measures the gain). Process-wide, so only entry points call it;
    returns whether glibc took both settings (False where mallopt does not exist).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success, 0 on error
    no_mmap = mallopt(M_MMAP_MAX, 0) == 1  # large blocks come from the reusable heap, not mmap
    keep = mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1  # keep up to 1 GiB of freed heap
    return no_mmap and keep


def _process_settings(cfg) -> None:
    import torch

    if cfg.keep_freed_memory and not torch.cuda.is_available() and not keep_freed_memory():
        print("fmtl: note: glibc's mallopt is not available here; --keep-freed-memory has no effect", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "fmtl/train.py") -> int:
    """Train as the command line says; the exit status (0, 2 for a user error, 130 for Ctrl-C)."""
    try:
        from fmtl.training.config import load_config
        from fmtl.training.run import run
    except ModuleNotFoundError as error:
        print(f"fmtl: error: training needs {error.name}, which is not installed: pip install 'fmtl[train]'",
              file=sys.stderr)  # fmt: skip
        return 2
    from fmtl.errors import ERROR_PREFIX, EXIT_USER_ERROR, FmtlError

    cfg = None
    try:
        cfg = load_config(argv, prog=prog)
        _process_settings(cfg)
        run(cfg)
    except FmtlError as error:
        print(f"{ERROR_PREFIX}{error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        saved = cfg is None or cfg.save_state
        print("fmtl: interrupted (continue from the last saved epoch with --resume RUN_DIR)" if saved
              else "fmtl: interrupted (run with --no-save-state: nothing to resume from)", file=sys.stderr)  # fmt: skip
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
