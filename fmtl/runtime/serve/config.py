"""What `fmtl serve` takes (ServeConfig, whose defaults are the command's) and how it fails (ServeError).

Used by every serving engine: the uvicorn one (fmtl.runtime.serve) and Ray Serve (fmtl.runtime.serve.ray_engine).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from fmtl.errors import FmtlError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # the Host names a loopback-only server answers by default


class ServeError(FmtlError):
    """The server cannot start or stopped badly (bad model, bad option): one line, non-zero exit."""


@dataclass
class ServeConfig:
    """Everything `fmtl serve` takes; the defaults are the command's."""

    model: Path  # the fmtl .onnx file
    host: str = "127.0.0.1"  # loopback only unless asked: a model server is not public by default
    port: int = 8000  # 0: any free port (the chosen one is printed)
    max_batch_size: int = 16  # most images per onnxruntime call (benchmarks/serve.py sweep)
    batch_wait_ms: float = 0.0  # wait this long for a fuller batch; 0 adds no latency at low load
    max_queue: int = 128  # images waiting at most (bounds the wait: about max_queue / images per second)
    queue_timeout_ms: float = 5000.0  # a request queued longer gets 503
    max_body_mb: float = 16.0  # request bodies above this get 413 (counted while reading)
    max_images: int = 64  # images in one request at most (413 above)
    drain_timeout: float = 30.0  # seconds to answer accepted requests after SIGTERM
    threads: int | None = None  # onnxruntime intra-op threads [the CPUs this process may use]
    parallel_batches: int | None = None  # under a backlog, batches at once, one thread each [the CPUs]
    max_pixels: int | None = None  # images with more pixels are refused before decoding [sized to the model]
    request_timeout: float = 10.0  # a whole request (headers and body) must arrive within this many seconds
    # open connections at most (uvicorn's setting): at the cap the one idle the longest is closed to make room, and
    # with none idle a request gets 503. An idle one costs about 10 KiB (benchmarks/serve_idle.py): 4,000 of them
    # 40 MiB, and with SPARE_FILES (fmtl.runtime.serve.process) they fit the usual hard limit of 4,096 open files
    limit_concurrency: int = 4000
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this many seconds
    allowed_hosts: tuple[str, ...] | None = None  # Host headers answered ("*": any) [loopback names, or any]

    def check(self) -> None:
        """Raise ServeError for option combinations that cannot work."""
        if self.max_images > self.max_queue:
            raise ServeError(f"--max-images ({self.max_images}) must not exceed --max-queue ({self.max_queue})")
        for name in ("max_batch_size", "max_queue", "max_images"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.parallel_batches is not None and self.parallel_batches < 1:
            raise ServeError("--parallel-batches must be at least 1")
        if self.max_body_mb <= 0 or self.queue_timeout_ms <= 0:
            raise ServeError("--max-body-mb and --queue-timeout-ms must be positive")
        if self.request_timeout <= 0 or self.keep_alive_timeout <= 0 or self.limit_concurrency < 1:
            raise ServeError("--request-timeout, --keep-alive-timeout and --limit-concurrency must be positive")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ServeError("--max-pixels must be at least 1")

    def lanes(self) -> int:
        """Batches run side by side under a backlog (fmtl.runtime.serve.batching): --parallel-batches, or one per CPU."""
        return self.parallel_batches or usable_cpus()

    def trusted_hosts(self) -> tuple[list[str], str | None]:
        """The Host names to answer, and a warning line when that is any name at all.

        Given names are used as given. Otherwise a server bound to loopback answers only the loopback
        names (a web page on another origin cannot reach it through DNS rebinding); one bound to every
        interface cannot know its public names, so it answers any, with a warning."""
        if self.allowed_hosts:
            return [host_name(name) for name in self.allowed_hosts], None
        if self.host in ("", "0.0.0.0", "::"):
            return ["*"], (f"warning: bound to {self.host or 'every interface'} and answering any Host header: "
                           "pass --allowed-hosts NAME,... to refuse DNS rebinding")  # fmt: skip
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name
            loopback = self.host == "localhost"
        return [*LOOPBACK_NAMES] if loopback else [host_name(self.host), *LOOPBACK_NAMES], None


def host_name(address: str) -> str:
    """``address`` as a Host header carries it: an IPv6 literal in brackets ("::1" -> "[::1]")."""
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:  # a name, a pattern such as *.example.com, or already in brackets
        return address


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as taskset/cgroups set it), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
