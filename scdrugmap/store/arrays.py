"""Embedding arrays in ``embeddings.zarr/``: crash-safe, resumable writes and row-selective reads.

An extraction writes into a *staging* directory. Each finished row chunk leaves a marker
file, so a killed run resumes at the first chunk without a marker instead of starting over.
Only when every chunk is written is the array moved (one directory rename) to its final
place, and only then does the index point readers at it. A reader therefore never sees a
half-written embedding: it either sees the previous complete array or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec

# Rows per chunk. 4,096 rows keeps a chunk of a 512-d float16 embedding at 4 MiB
# uncompressed (a good unit for local disks and for object stores), and is small enough
# that a killed extraction loses little work. See benchmarks/store_bench.py.
DEFAULT_CHUNK_ROWS = 4096
DTYPES = ("float16", "float32")
STAGING = "_staging"


def _compressor():
    # Blosc-lz4 with byte shuffle: dense model embeddings barely compress, so decode speed
    # wins. Measured on a 326,751 x 978 float16 array (benchmarks/store_bench.py, 2 cores):
    # full read 2.9 GB/s at 361 MB vs 1.5 GB/s at 202 MB for zstd level 3.
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def safe_name(name: str) -> str:
    """A path component for a backbone or dataset name ('geneformer+lora:r1' -> 'geneformer%2Blora%3Ar1')."""
    return "".join(c if (c.isalnum() or c in "._-") else f"%{ord(c):02X}" for c in name)


class StagedArray:
    """One backbone x dataset embedding being written; see the module docstring."""

    def __init__(self, root: Path, backbone: str, dataset: str, n_rows: int, dim: int,
                 dtype: str, chunk_rows: int, job: dict):
        self.root = Path(root)
        self.backbone, self.dataset = backbone, dataset
        self.n_rows, self.dim, self.dtype, self.chunk_rows = n_rows, dim, dtype, chunk_rows
        job = dict(job, backbone=backbone, dataset=dataset, n_rows=n_rows, dim=dim,
                   dtype=dtype, chunk_rows=chunk_rows)
        key = hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = self.root / STAGING / f"{safe_name(backbone)}__{safe_name(dataset)}__{key}"
        self.array_dir = self.dir / "array"
        self.done_dir = self.dir / "done"
        if self.array_dir.exists() and (self.dir / "job.json").exists():
            self.array = zarr.open_array(str(self.array_dir), mode="r+")
        else:
            # A different job for the same pair is stale: its parameters no longer apply.
            for old in (self.root / STAGING).glob(f"{safe_name(backbone)}__{safe_name(dataset)}__*"):
                shutil.rmtree(old, ignore_errors=True)
            self.done_dir.mkdir(parents=True, exist_ok=True)
            self.array = zarr.create_array(
                store=str(self.array_dir), shape=(n_rows, dim), chunks=(chunk_rows, dim),
                dtype=dtype, compressors=_compressor(), fill_value=0, zarr_format=3,
            )
            (self.dir / "job.json").write_text(json.dumps(job, sort_keys=True, default=str))

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        return i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.n_rows)

    def done_chunks(self) -> set[int]:
        return {int(p.name) for p in self.done_dir.iterdir() if p.name.isdigit()}

    def write_chunk(self, i: int, values: np.ndarray) -> None:
        start, stop = self.chunk_bounds(i)
        if values.shape != (stop - start, self.dim):
            raise ValueError(f"chunk {i}: expected shape {(stop - start, self.dim)}, got {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"chunk {i} of {self.backbone}/{self.dataset} has non-finite values")
        self.array[start:stop] = values.astype(self.dtype, copy=False)
        # The marker is written only after the chunk's bytes are: it is the resume point.
        marker = self.done_dir / str(i)
        with open(marker, "w") as f:
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> str:
        """Move the complete array to its final place; returns its path relative to the root."""
        missing = set(range(self.n_chunks)) - self.done_chunks()
        if missing:
            raise RuntimeError(f"cannot finish {self.backbone}/{self.dataset}: {len(missing)} chunks missing")
        rel = f"{safe_name(self.backbone)}/{safe_name(self.dataset)}/{uuid.uuid4().hex[:12]}"
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.array_dir, final)
        return rel

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def open_array(root: Path, rel: str):
    return zarr.open_array(str(Path(root) / rel), mode="r")


def read_rows(array, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of a row-chunked array, reading only the chunks they touch.

    Contiguous runs of needed chunks are read as one slice (zarr decodes their chunks
    concurrently), then the wanted rows are picked out in memory, straight into ``out``
    when given (any float dtype; saves a copy when the caller assembles several arrays).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((len(rows), array.shape[1]), dtype=array.dtype)
    if len(rows) == 0:
        return out
    if len(rows) == array.shape[0]:
        out[:] = array[:]
        return out
    chunk = array.chunks[0]
    needed = np.unique(rows // chunk)
    # split the needed chunks into runs of consecutive chunk indices; rows are sorted, so
    # each run's rows are one contiguous stretch of ``rows`` (found by binary search)
    breaks = np.flatnonzero(np.diff(needed) != 1) + 1
    for run in np.split(needed, breaks):
        lo, hi = int(run[0]) * chunk, min((int(run[-1]) + 1) * chunk, array.shape[0])
        a, b = np.searchsorted(rows, [lo, hi])
        block = array[lo:hi]
        if block.dtype == out.dtype:
            np.take(block, rows[a:b] - lo, axis=0, out=out[a:b])
        else:                                   # e.g. float16 stored, float32 asked for
            out[a:b] = np.take(block, rows[a:b] - lo, axis=0)
    return out


class IOStats:
    """Bytes a store has read: the index (downloaded once for a URL store) and embedding chunks."""

    def __init__(self):
        import threading

        self._lock = threading.Lock()
        self.index_bytes = 0          # bytes of index.duckdb transferred (0 when a cached copy was valid)
        self.index_cached = False
        self.chunk_bytes = 0          # bytes of Zarr objects read (chunks and array metadata)
        self.requests = 0             # Zarr objects read

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.chunk_bytes += nbytes
            self.requests += 1

    @property
    def total(self) -> int:
        return self.index_bytes + self.chunk_bytes


class CountingStore(zarr.storage.WrapperStore):
    """A zarr Store wrapper that counts every byte read through it in an :class:`IOStats`."""

    def __init__(self, store, stats: IOStats):
        super().__init__(store)
        self.stats = stats

    def _with_store(self, store):
        return type(self)(store, self.stats)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.stats.add(len(buf))
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        for buf in bufs:
            if buf is not None:
                self.stats.add(len(buf))
        return bufs
