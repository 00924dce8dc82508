"""Packed shards: a dataset written as LitData chunks, trained from a folder or a bucket by many machines.

- ``pack``: a source's train, val and test splits as LitData chunks (its ``BinaryWriter``), uint8 at the
  source size, in a seeded order; one chunk at a time, each renamed into place when whole, so a killed
  pack resumes at the first missing chunk. ``fmtl-shards.json`` (classes, shapes, labels) is written last.
- ``open_shards``: one split as an ``ImageSet`` whose ``pixels`` read batches from the chunks: in place
  for a folder, else fetched by LitData's downloaders (``s3://``, ``gs://``, ``local:DIR``, ...) into a
  local cache kept under a byte limit (``FMTL_SHARD_CACHE_MB``; LitData's own cache does not bound
  random access, docs/shards.md).
- ``ShardSampler``: ``EpochSampler``'s contract over chunks: the order is a pure function of (seed, epoch);
  each rank reads only its own chunks (and at most two it shares at its part's ends).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from fmtl.errors import DataError

MANIFEST = "fmtl-shards.json"
INDEX, LABELS = "index.json", "labels.npy"
SHARDS_VERSION = 1
CHUNK_BYTES = 64 << 20  # a chunk's images: LitData's advice for object storage
CANONICAL = 8  # virtual ranks the order is dealt to: the same order for 1, 2, 4 or 8 processes
WINDOW = 2  # chunks' worth of a part shuffled together (what a stream needs cached at once)
URL_PREFIXES = ("s3://", "gs://", "r2://", "az://", "azure://", "hf://", "local:")
INSTALL = "pip install 'fmtl[stream]'"


class ShardError(DataError):
    """A DataError that stays one line when a DataLoader worker re-raises it with its traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).strip().splitlines()[-1].removeprefix(f"{__name__}.ShardError: "))


def is_shards(source: str) -> bool:
    """Whether ``source`` names packed shards: a URL, or a folder holding ``fmtl-shards.json``."""
    return str(source).startswith(URL_PREFIXES) or (Path(source).expanduser() / MANIFEST).is_file()


def _litdata():
    try:
        import litdata.streaming.downloader as downloader
        import litdata.streaming.writer as writer
    except ModuleNotFoundError:
        raise DataError(f"training from packed shards needs LitData: {INSTALL}") from None
    return writer, downloader


# ---------------------------------------------------------------- reading


class Remote:
    """Where the shards are: a local folder read in place, or a URL fetched into ``cache`` by LitData."""

    def __init__(self, source: str, cache: Path) -> None:
        self.source = str(source).rstrip("/")
        self.url = self.source.startswith(URL_PREFIXES)
        self.root = Path(self.source).expanduser() if not self.url else None
        self.cache = cache / "shards" / _key(self.source) if self.url else None

    def local(self, name: str, chunks: list[dict] | None = None) -> Path:
        """A local path of the file ``name`` (``split/file``), fetched first when the shards are remote."""
        if not self.url:
            return self.root / name
        path = self.cache / name
        if not path.is_file():
            _, downloader = _litdata()
            path.parent.mkdir(parents=True, exist_ok=True)
            remote = self.source.removeprefix("local:")
            try:
                downloader.get_downloader(remote, str(self.cache), chunks or []).download_file(
                    f"{remote}/{name}", str(path)
                )
            except Exception as error:  # noqa: BLE001 - any fetch failure is one line naming the file
                raise ShardError(f"cannot fetch {self.source}/{name}: {error}") from None
        if not path.is_file():
            raise ShardError(f"cannot fetch {self.source}/{name}")
        return path


def _key(source: str) -> str:
    import hashlib

    return hashlib.sha256(source.encode()).hexdigest()[:24]


def read_manifest(remote: Remote) -> dict:
    try:
        manifest = json.loads(remote.local(MANIFEST).read_text())
    except (OSError, ValueError, ShardError):
        raise ShardError(f"{remote.source} holds no complete pack ({MANIFEST} missing): run `fmtl data pack`") from None
    if manifest.get("version") != SHARDS_VERSION:
        raise ShardError(f"{remote.source} was packed by another version of fmtl: pack it again")
    return manifest


class ShardPixels:
    """A split's images ``[N, C, H, W]`` uint8, indexed like a tensor, read a batch at a time from chunks."""

    dtype = torch.uint8
    streamed = True  # never copied whole (to memory or a device): read as batches ask

    def __init__(self, remote: Remote, split: str, info: dict, chunks: list[dict], cache_bytes: int) -> None:
        self.remote, self.split, self.info, self.chunks, self.cache_bytes = remote, split, info, chunks, cache_bytes
        self.shape = torch.Size([info["count"], *info["shape"]])
        self.chunk_items = info["chunk_items"]
        self.item_bytes = int(np.prod(info["shape"]))
        self._maps: dict[int, np.ndarray] = {}  # this process's open chunks (mapped: they outlive an eviction)

    ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # a worker maps its own

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        ids = torch.as_tensor(index, dtype=torch.long).numpy()
        out = np.empty((len(ids), self.item_bytes), dtype=np.uint8)
        chunk_of = ids // self.chunk_items
        for chunk in np.unique(chunk_of):
            where = np.nonzero(chunk_of == chunk)[0]
            data = self._chunk(int(chunk))
            count = int(data[:4].view(np.uint32)[0])
            ends = data[8 : 8 + 4 * count].view(np.uint32)  # item i ends where item i + 1 begins
            starts = ends[ids[where] - chunk * self.chunk_items].astype(np.int64) - self.item_bytes
            out[where] = data[starts[:, None] + np.arange(self.item_bytes)]  # the image: each item's last leaf
        _trace(self.split, ids)
        return torch.from_numpy(out).view(len(ids), *self.shape[1:])

    def _chunk(self, chunk: int) -> np.ndarray:
        if chunk in self._maps:
            return self._maps[chunk]
        entry = self.chunks[chunk]
        name = f"{self.split}/{entry['filename']}"
        if self.remote.url:
            path = self._fetch(chunk, name)
        else:
            path = self.remote.local(name)
        try:
            size = path.stat().st_size
        except OSError:
            raise ShardError(f"shard {self.remote.source}/{name} is missing: pack again") from None
        if size != entry["chunk_bytes"]:
            raise ShardError(f"shard {self.remote.source}/{name} is {size:,} bytes, its index says "
                             f"{entry['chunk_bytes']:,} (truncated or replaced): pack again")  # fmt: skip
        if len(self._maps) >= 2 * WINDOW * CANONICAL:  # a bounded number of mappings: the oldest goes
            self._maps.pop(next(iter(self._maps)))
        self._maps[chunk] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[chunk]

    def _fetch(self, chunk: int, name: str) -> Path:
        """The chunk in the local cache: fetched after making room under the byte limit (LRU, one lock a node)."""
        from filelock import FileLock

        path = self.remote.cache / name
        with FileLock(str(self.remote.cache / ".lock")):
            if not path.is_file():
                _evict(self.remote.cache, self.cache_bytes - self.chunks[chunk]["chunk_bytes"])
                self.remote.local(name, self.chunks)
                _trace(f"fetch-{self.split}", np.array([chunk]))
            os.utime(path)  # most recently used
        return path


def _evict(cache: Path, keep_bytes: int) -> None:
    """Remove the least recently used chunks until the cache holds at most ``keep_bytes`` of them."""
    files = sorted(cache.glob("*/*.bin"), key=lambda p: p.stat().st_mtime_ns)
    total = sum(p.stat().st_size for p in files)
    for path in files:
        if total <= keep_bytes:
            break
        total -= path.stat().st_size
        path.unlink(missing_ok=True)


def _trace(split: str, ids: np.ndarray) -> None:
    """With $FMTL_SHARD_TRACE set (tests): append ``rank split id...`` to a file of that folder per process."""
    folder = os.environ.get("FMTL_SHARD_TRACE")
    if folder:
        with open(Path(folder) / f"reads-{os.getpid()}.txt", "a") as handle:
            handle.write(f"{os.environ.get('RANK', '0')} {split} {' '.join(map(str, ids.tolist()))}\n")


def open_shards(source: str, split: str, cache: Path) -> tuple[torch.Tensor, ShardPixels, list[str]]:
    """One packed split as (labels, pixels, classes); one line when the pack, a split or a chunk is missing."""
    _litdata()
    remote = Remote(source, cache)
    manifest = read_manifest(remote)
    if split not in manifest["splits"]:
        from fmtl.errors import MissingSplitError

        raise MissingSplitError(f"{source} was packed without a {split} split")
    info = manifest["splits"][split]
    try:
        chunks = json.loads(remote.local(f"{split}/{INDEX}").read_text())["chunks"]
        labels = torch.from_numpy(np.load(remote.local(f"{split}/{LABELS}")).astype(np.int64))
    except (OSError, ValueError, KeyError):
        raise ShardError(f"{source}/{split} has no readable {INDEX} or {LABELS}: pack again") from None
    if not remote.url:  # a folder (a shared file system) is checked whole now: a missing chunk is one line here
        for entry in chunks:
            path = remote.root / split / entry["filename"]
            if not path.is_file() or path.stat().st_size != entry["chunk_bytes"]:
                state = "missing" if not path.is_file() else "truncated or replaced"
                raise ShardError(f"shard {source}/{split}/{entry['filename']} is {state}: pack again")
    cache_bytes = int(float(os.environ.get("FMTL_SHARD_CACHE_MB", 4096)) * (1 << 20))
    return labels, ShardPixels(remote, split, info, chunks, cache_bytes), manifest["classes"]


def open_split(source: str, split: str, cache: Path):
    """``split`` of packed shards as an ImageSet (``all``, a separate test source's whole: its test split)."""
    from fmtl.training.data.imageset import ImageSet

    labels, pixels, classes = open_shards(source, "test" if split == "all" else split, cache)
    fit = pixels.info.get("fit", "stretch")
    return ImageSet(pixels, labels, classes, f"shards:{source}", mapped=True, fit=fit)


# ---------------------------------------------------------------- the order


class ShardSampler:
    """``EpochSampler`` over chunks: the same number of batches, in an order that is a pure function of (seed, epoch).

    Each epoch the chunks are permuted by (seed, epoch) and their positions, chunk by chunk, cut into ``canonical``
    parts (laid bit-reversed); a part is shuffled a window of chunks at a time and, with several processes, padded with its own
    positions. Global batch ``g`` is part ``g % canonical``'s batch ``g // canonical``. Accelerate hands rank ``r``
    the batches ``r, r + W, ...``, so with ``W`` dividing ``canonical`` rank ``r`` reads only the parts ``r mod W``
    (one run of chunks, sharing at most the two at its ends), and the sequence of batches is the same for every such W.
    """

    def __init__(self, chunk_of: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True,
                 processes: int = 1, canonical: int = CANONICAL) -> None:  # fmt: skip
        self.chunk_of = chunk_of  # the chunk of each position
        self.n, self.batch_size, self.seed, self.shuffle = len(chunk_of), batch_size, seed, shuffle
        self.processes = processes
        self.canonical = canonical if canonical % processes == 0 else processes
        self.epoch, self.start = 0, 0
        self.window = WINDOW * max(1, int(torch.bincount(chunk_of).max())) if len(chunk_of) else 1

    def seek(self, epoch: int, start: int = 0) -> None:
        """The epoch to draw, and the first global batch of it to hand out (a resumed run's position)."""
        self.epoch, self.start = epoch, start

    def batches(self) -> int:
        """Batches in a whole epoch, all ranks together: EpochSampler's count, so the run's plan holds."""
        batches = math.ceil(self.n / self.batch_size)
        return batches if self.processes == 1 else math.ceil(batches / self.processes) * self.processes

    def __len__(self) -> int:
        return self.batches() - self.start

    def parts(self) -> list[torch.Tensor]:
        """This epoch's parts: the positions each virtual rank reads, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        chunks = torch.unique(self.chunk_of)
        if self.shuffle:
            chunks = chunks[torch.randperm(len(chunks), generator=generator)]
        place = torch.zeros(int(self.chunk_of.max()) + 1 if self.n else 0, dtype=torch.long)
        place[chunks] = torch.arange(len(chunks))
        stream = torch.sort(place[self.chunk_of] * self.n + torch.arange(self.n)).indices  # chunk after chunk
        total, size, canonical = self.batches(), self.batch_size, self.canonical
        need = total * size if self.processes > 1 else self.n
        sizes = [len(range(v, total, canonical)) * size for v in range(canonical)]
        sizes[(total - 1) % canonical] -= total * size - need  # the short last batch of one process
        placed = sorted(range(canonical), key=self._place)  # the parts in the order they take the stream
        cuts = [round(int(c) * self.n / max(1, need)) for c in np.cumsum([sizes[v] for v in placed])[:-1]]
        parts = [torch.empty(0, dtype=torch.long)] * canonical
        for v, piece in zip(placed, torch.tensor_split(stream, cuts), strict=True):
            want = sizes[v]
            if self.shuffle:
                blocks = torch.split(piece, self.window)
                piece = torch.cat([b[torch.randperm(len(b), generator=generator)] for b in blocks] or [piece])
            if want > len(piece):  # whole batches for every rank: wrap around the part's own positions
                piece = (piece if len(piece) else stream[:1]).repeat(math.ceil(want / max(1, len(piece))))
            parts[v] = piece[:want]
        return parts

    def _place(self, part: int) -> int:
        """Where part ``part`` lies in the stream: bit-reversed, so the parts of one rank (``part mod W``) are
        neighbours for every W dividing ``canonical`` and a rank's chunks are one run of the stream."""
        bits = self.canonical.bit_length() - 1
        if self.canonical != 1 << bits:
            return part
        return int(f"{part:0{bits}b}"[::-1], 2) if bits else 0

    def __iter__(self):
        parts, size = self.parts(), self.batch_size
        for batch in range(self.start, self.batches()):
            local = batch // self.canonical
            yield parts[batch % self.canonical][local * size : (local + 1) * size].tolist()


def shard_sampler(data, batch_size: int, seed: int, processes: int = 1):
    """A ShardSampler for a set read from shards (None for any other: the Trainer's EpochSampler then)."""
    pixels = data.pixels
    if not isinstance(pixels, ShardPixels):
        return None
    rows = torch.arange(len(pixels)) if data.rows is None else data.rows
    return ShardSampler(rows // pixels.chunk_items, batch_size, seed, processes=processes)
