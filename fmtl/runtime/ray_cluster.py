"""Joining a Ray cluster, or starting a local one on loopback only: shared by `fmtl infer --engine ray`
(fmtl.runtime.ray_infer) and `fmtl serve --engine ray` (fmtl.runtime.serve.ray_engine).

Needs the ray extra; its importers import it only after checking that ray is installed.
"""

from __future__ import annotations

import logging
import os

import ray


def connect_cluster(address: str | None, error: type[Exception]) -> bool:
    """Join ``address`` or start a local cluster (loopback only); True when this process started it.

    A connection this process already has is reused. Failing to reach the cluster raises ``error``
    (the calling command's one-line error class)."""
    if ray.is_initialized():
        return False
    try:
        if address:
            if address.split("://")[-1].rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
                loopback_mode()  # a cluster of this machine started by start_local_cluster or `ray start`
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            start_local_cluster()
    except (ConnectionError, RuntimeError, ValueError) as failure:
        raise error(f"cannot reach the Ray cluster at {address or 'a new local cluster'}: {failure}") from None
    return True


def start_local_cluster(num_cpus: int | None = None) -> str:
    """Start a one-machine Ray cluster in this process, listening on loopback only; return its address."""
    loopback_mode()
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray.get_runtime_context().gcs_address


def loopback_mode() -> None:
    """Make Ray use 127.0.0.1 as this node's address, as it does on macOS and Windows.

    By default Ray's servers listen on every interface and Ray rewrites 127.0.0.1 to the host's
    address. A cluster of one machine needs no network. A driver joining such a cluster must use
    the same address, or it waits forever for a node at the host's address. Set: the environment
    variable, for the processes Ray starts, and the constant it was read into when ray was imported.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
