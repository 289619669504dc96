"""Embedding arrays in ``embeddings.zarr/``: crash-safe, resumable writes and checked, row-selective reads.

An extraction writes into a *staging* directory. Each finished row chunk leaves a marker
file, so a killed run resumes at the first chunk without a marker instead of starting over.
When every chunk is written, the array's final place is recorded in the staging directory
(``final``) and the array is moved there (one directory rename); only then does the index
point readers at it. A reader therefore never sees a half-written embedding, and a run killed
between the rename and the index commit is finished by the next run without recomputing.

Every chunk carries a CRC-32C checksum (Zarr v3's ``crc32c`` codec, after Blosc), and every
chunk is written even when it is all zeros (``write_empty_chunks``), so a reader can tell a
damaged chunk (checksum mismatch) and a missing one (an absent file would otherwise read as
zeros) from data: both are a :class:`ChunkError` naming the array and the chunk. Arrays
written before checksums existed are read as before (``checked`` is False for them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec

from ..errors import UserError
from .common import disk_error_or
from .constants import DEFAULT_CHUNK_ROWS, DTYPES  # noqa: F401  (re-exported: the store's constants)

STAGING = "_staging"
FINAL = "final"                  # in a staging directory: where its finished array was moved
ARRAY_CONFIG = {"write_empty_chunks": True}


def _compressors():
    # Blosc-lz4 with byte shuffle: dense model embeddings barely compress, so decode speed
    # wins. Measured on a 326,751 x 978 float16 array (benchmarks/store_bench.py, 2 cores):
    # full read 2.9 GB/s at 361 MB vs 1.5 GB/s at 202 MB for zstd level 3. CRC-32C of the
    # compressed bytes last, so the checksum covers exactly what is on disk.
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def create_array(path, shape, chunks, dtype):
    """A new embedding array at ``path`` in the store's layout (checksummed chunks, all written)."""
    return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype, compressors=_compressors(),
                             fill_value=0, zarr_format=3, config=ARRAY_CONFIG)


def is_checked(array) -> bool:
    """Whether ``array`` was written with per-chunk checksums (and every chunk present)."""
    return any(isinstance(c, Crc32cCodec) for c in array.metadata.codecs)


def safe_name(name: str) -> str:
    """A path component for a backbone or dataset name ('geneformer+lora:r1' -> 'geneformer%2Blora%3Ar1')."""
    return "".join(c if (c.isalnum() or c in "._-") else f"%{ord(c):02X}" for c in name)


# Separates backbone, dataset and job key in a staging directory's name: safe_name never writes
# it, so one name belongs to one (backbone, dataset) pair ('__' did not: backbone 'a' with
# dataset 'b__c' and backbone 'a__b' with dataset 'c' shared the prefix 'a__b__c__').
STAGING_SEP = "+"


def staging_name(backbone: str, dataset: str, key: str) -> str:
    return f"{safe_name(backbone)}{STAGING_SEP}{safe_name(dataset)}{STAGING_SEP}{key}"


def staging_pair(staging_dir: Path) -> tuple[str, str] | None:
    """The ``(safe_name(backbone), safe_name(dataset))`` a staging directory belongs to: from its
    name, or for one an older version named ``<backbone>__<dataset>__<key>`` (ambiguous) from
    its job.json; None when that cannot be read (such a directory is left alone)."""
    parts = staging_dir.name.split(STAGING_SEP)
    if len(parts) == 3:
        return parts[0], parts[1]
    try:
        job = json.loads((staging_dir / "job.json").read_text())
        return safe_name(str(job["backbone"])), safe_name(str(job["dataset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ChunkError(UserError):
    """A chunk of an embedding array that is damaged (checksum) or missing."""

    def __init__(self, rel: str, chunk: int, rows: tuple[int, int], problem: str, fix: str | None = None):
        self.rel, self.chunk, self.problem = rel, chunk, problem
        super().__init__(f"embedding array {rel}: chunk {chunk} (rows {rows[0]:,}-{rows[1] - 1:,}) is {problem}: "
                         + (fix or "re-extract it (--force), or restore the store from its pack"))


class ArrayMissing(Exception):
    """An array that the index names but that is not on disk (deleted, or replaced meanwhile)."""

    def __init__(self, rel: str):
        self.rel = rel
        super().__init__(rel)


class MissingChunk(Exception):
    """Raised by a strict :class:`CountingStore` for a chunk key that is absent."""


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StagedArray:
    """One backbone x dataset embedding being written; see the module docstring.

    ``finished`` is the relative path of the complete array when an earlier run moved it into
    place but was stopped before the index pointed at it; :func:`commit_staged` then commits it.
    """

    def __init__(self, root: Path, backbone: str, dataset: str, n_rows: int, dim: int,
                 dtype: str, chunk_rows: int, job: dict):
        self.root = Path(root)
        self.backbone, self.dataset = backbone, dataset
        self.n_rows, self.dim, self.dtype, self.chunk_rows = n_rows, dim, dtype, chunk_rows
        job = dict(job, backbone=backbone, dataset=dataset, n_rows=n_rows, dim=dim,
                   dtype=dtype, chunk_rows=chunk_rows)
        key = hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = self.root / STAGING / staging_name(backbone, dataset, key)
        self.array_dir = self.dir / "array"
        self.done_dir = self.dir / "done"
        self.finished = self._finished_before()
        self.created = False                  # this run made the staging directory
        self.written: list[int] = []          # chunks this run wrote (undone by :meth:`rollback`)
        self.array = None
        if self.finished:
            return
        if self.array_dir.exists() and (self.dir / "job.json").exists():
            self.array = zarr.open_array(str(self.array_dir), mode="r+", config=ARRAY_CONFIG)
            return
        # A different job for the same pair is stale: its parameters no longer apply.
        mine = (safe_name(backbone), safe_name(dataset))
        staging_root = self.root / STAGING
        for old in sorted(staging_root.iterdir()) if staging_root.is_dir() else []:
            if old != self.dir and old.is_dir() and staging_pair(old) == mine:
                discard_staging(self.root, old)
        self.created = True
        try:
            self.done_dir.mkdir(parents=True, exist_ok=True)
            self.array = create_array(self.array_dir, (n_rows, dim), (chunk_rows, dim), dtype)
            (self.dir / "job.json").write_text(json.dumps(job, sort_keys=True, default=str))
        except BaseException as e:
            self.discard()
            raise disk_error_or(e, self.root, f"creating the staging array of {backbone} x {dataset}")

    def _finished_before(self) -> str | None:
        marker = self.dir / FINAL
        if not marker.is_file():
            return None
        rel = marker.read_text().strip()
        if (self.root / rel).is_dir() and not self.array_dir.exists():
            return rel
        marker.unlink()                   # stopped before the rename: the array is still in staging
        return None

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        return i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.n_rows)

    def done_chunks(self) -> set[int]:
        if self.finished:
            return set(range(self.n_chunks))
        return {int(p.name) for p in self.done_dir.iterdir() if p.name.isdigit()}

    def write_chunk(self, i: int, values: np.ndarray) -> None:
        start, stop = self.chunk_bounds(i)
        if values.shape != (stop - start, self.dim):
            raise ValueError(f"chunk {i}: expected shape {(stop - start, self.dim)}, got {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"chunk {i} of {self.backbone}/{self.dataset} has non-finite values")
        self.written.append(i)
        self.array[start:stop] = values.astype(self.dtype, copy=False)
        # The marker is written only after the chunk's bytes are: it is the resume point.
        marker = self.done_dir / str(i)
        with open(marker, "w") as f:
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> str:
        """Move the complete array to its final place; returns its path relative to the root."""
        if self.finished:
            return self.finished
        missing = set(range(self.n_chunks)) - self.done_chunks()
        if missing:
            raise RuntimeError(f"cannot finish {self.backbone}/{self.dataset}: {len(missing)} chunks missing")
        rel = f"{safe_name(self.backbone)}/{safe_name(self.dataset)}/{uuid.uuid4().hex[:12]}"
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        _write_synced(self.dir / FINAL, rel)          # first say where it goes, then move it
        os.replace(self.array_dir, final)
        self.finished = rel
        return rel

    def rollback(self) -> None:
        """Undo what this run wrote (after a failure such as a full disk): the staging directory
        if this run made it, else the chunks (and markers) it added."""
        if self.created:
            self.discard()
            return
        for i in self.written:
            with contextlib.suppress(OSError):
                (self.done_dir / str(i)).unlink()
            for key in _chunk_files(self.array_dir, i):
                with contextlib.suppress(OSError):
                    key.unlink()
        self.written = []

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _chunk_files(array_dir: Path, i: int):
    return [array_dir / "c" / str(i) / "0"]


def discard_staging(root: Path, staging_dir: Path) -> None:
    """Remove a staging directory, and the finished array it moved out but never committed."""
    marker = staging_dir / FINAL
    if marker.is_file():
        rel = marker.read_text().strip()
        if rel and ".." not in rel.split("/"):
            shutil.rmtree(Path(root) / rel, ignore_errors=True)
    shutil.rmtree(staging_dir, ignore_errors=True)


def open_array(root: Path, rel: str):
    return zarr.open_array(str(Path(root) / rel), mode="r")


def _find_bad_chunk(array, rel: str, lo_chunk: int, hi_chunk: int) -> ChunkError | None:
    """Which chunk of ``[lo_chunk, hi_chunk]`` cannot be read, as a :class:`ChunkError` (None: all can)."""
    chunk = array.chunks[0]
    for c in range(lo_chunk, hi_chunk + 1):
        rows = (c * chunk, min((c + 1) * chunk, array.shape[0]))
        try:
            array[rows[0]:rows[1]]
        except MissingChunk:
            return ChunkError(rel, c, rows, "missing (its file is gone)")
        except (ValueError, RuntimeError) as e:
            what = "its CRC-32C checksum does not match" if "checksum" in str(e).lower() else str(e).split("\n")[0]
            return ChunkError(rel, c, rows, f"damaged ({what})")
    return None


def _read(array, lo: int, hi: int, rel: str | None):
    try:
        return array[lo:hi]
    except (MissingChunk, ValueError, RuntimeError):
        if rel is None:
            raise
        bad = _find_bad_chunk(array, rel, lo // array.chunks[0], (hi - 1) // array.chunks[0])
        if bad is None:
            raise
        raise bad from None


def read_rows(array, rows: np.ndarray, out: np.ndarray | None = None, rel: str | None = None) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of a row-chunked array, reading only the chunks they touch.

    Arrays of the store's own layout on a local disk are read directly (chunk files checked
    and decoded into reused buffers, whole chunks copied into place; see below); any other
    array (a remote store, an older layout) through zarr: contiguous runs of needed chunks are
    read as one slice (zarr decodes their chunks concurrently), then the wanted rows are picked
    out. The result goes straight into ``out`` when given (any float dtype; saves a copy when
    the caller assembles several arrays). With ``rel`` (the array's path in the store), a
    damaged or missing chunk is a :class:`ChunkError` naming it.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((len(rows), array.shape[1]), dtype=array.dtype)
    read_rows_many([(array, rows, out, rel)])
    return out


def read_rows_many(jobs) -> None:
    """``read_rows`` for several ``(array, rows, out, rel)`` at once: every chunk of every array
    is one task of a shared pool of reader threads (decoding releases the GIL)."""
    tasks = []
    for array, rows, out, rel in jobs:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            continue
        local = _local_layout(array)
        if local is None:
            tasks.append(lambda array=array, rows=rows, out=out, rel=rel: _read_rows_zarr(array, rows, out, rel))
        else:
            tasks.extend(_local_tasks(array, local, rows, out, rel or str(array.store_path.path)))
    _run(tasks)


def _read_rows_zarr(array, rows: np.ndarray, out: np.ndarray, rel: str | None) -> None:
    if len(rows) == array.shape[0]:
        out[:] = _read(array, 0, array.shape[0], rel)
        return
    chunk = array.chunks[0]
    needed = np.unique(rows // chunk)
    # split the needed chunks into runs of consecutive chunk indices; rows are sorted, so
    # each run's rows are one contiguous stretch of ``rows`` (found by binary search)
    breaks = np.flatnonzero(np.diff(needed) != 1) + 1
    for run in np.split(needed, breaks):
        lo, hi = int(run[0]) * chunk, min((int(run[-1]) + 1) * chunk, array.shape[0])
        a, b = np.searchsorted(rows, [lo, hi])
        block = _read(array, lo, hi, rel)
        if block.dtype == out.dtype:
            np.take(block, rows[a:b] - lo, axis=0, out=out[a:b])
        else:                                   # e.g. float16 stored, float32 asked for
            out[a:b] = np.take(block, rows[a:b] - lo, axis=0)


# ---- the direct local reader ----------------------------------------------------------------
# Why not zarr for local reads: on the benchmark machine (benchmarks/store_bench.py) decoding
# each chunk into fresh memory cost more than the decoding itself (a page fault per 4 KiB,
# ~2 s per GB: one core decoded 777 MB of hvg chunks in 2.14 s into new buffers, 0.37 s into a
# reused one), and a selected row was copied twice. The store's own layout is simple enough to
# read directly: one file per row chunk, c/<i>/0, holding Blosc(bytes) + CRC-32C (little-endian).
_THREAD = threading.local()
_READ_THREADS = max(1, min(4, os.cpu_count() or 1))


def _local_layout(array):
    """``(chunk directory, stats or None)`` when ``array`` is a checksummed 2-d array of the store's
    own layout on a local disk (read directly), else None (read through zarr)."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
        from zarr.storage import LocalStore

        meta = array.metadata
        store, stats = array.store_path.store, None
        if isinstance(store, CountingStore):
            store, stats = store._store, store.stats
        codecs = meta.codecs
        if not (isinstance(store, LocalStore) and len(array.shape) == 2 and array.chunks[1] == array.shape[1]
                and len(codecs) == 3 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec)
                and isinstance(codecs[2], Crc32cCodec) and sys.byteorder == "little"
                and str(getattr(codecs[0].endian, "value", codecs[0].endian)) in ("little", "None")
                and isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)
                and meta.chunk_key_encoding.separator == "/"):
            return None
        return Path(store.root) / array.store_path.path / "c", stats
    except Exception:               # another zarr version's internals: the zarr path works everywhere
        return None


def _chunk_bytes(array, folder: Path, stats, c: int, rel: str, into: np.ndarray | None = None) -> np.ndarray:
    """Chunk ``c`` decoded, its checksum verified: into ``into`` (a C-contiguous block of exactly
    one chunk's rows and dtype), else into this thread's reused buffer (a view of it)."""
    import google_crc32c
    from numcodecs import blosc

    chunk = array.chunks[0]
    rows = (c * chunk, min((c + 1) * chunk, array.shape[0]))
    try:
        raw = (folder / str(c) / "0").read_bytes()
    except FileNotFoundError:
        raise ChunkError(rel, c, rows, "missing (its file is gone)") from None
    if stats is not None:
        stats.add(len(raw))
    if len(raw) < 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ChunkError(rel, c, rows, "damaged (its CRC-32C checksum does not match)")
    size = chunk * array.shape[1] * array.dtype.itemsize
    # Blosc's 16-byte header: uncompressed size at bytes 4-7, compressed size at 12-15 (little-endian).
    # A chunk must decode to exactly one chunk of this array, or the array's metadata is damaged.
    body = len(raw) - 4
    if body < 16 or int.from_bytes(raw[12:16], "little") != body or int.from_bytes(raw[4:8], "little") != size:
        found = int.from_bytes(raw[4:8], "little") if body >= 16 else 0
        raise ChunkError(rel, c, rows, f"damaged (it holds {found:,} bytes where the array's zarr.json makes a chunk "
                                       f"{size:,})")
    if into is not None:
        buf = into.reshape(-1).view(np.uint8)
    else:
        buf = getattr(_THREAD, "buf", None)
        if buf is None or len(buf) < size:
            buf = _THREAD.buf = np.empty(size, dtype=np.uint8)
    try:
        blosc.decompress(memoryview(raw)[:-4], buf[:size])
    except Exception as e:
        raise ChunkError(rel, c, rows, f"damaged (it does not decode: {str(e).splitlines()[0]})") from None
    return buf[:size].view(array.dtype).reshape(chunk, array.shape[1])


def _local_tasks(array, layout, rows: np.ndarray, out: np.ndarray, rel: str) -> list:
    folder, stats = layout
    chunk = array.chunks[0]
    needed = np.unique(rows // chunk)
    bounds = np.searchsorted(rows, np.stack([needed * chunk, np.minimum((needed + 1) * chunk, array.shape[0])]))

    def one(c: int, a: int, b: int) -> None:
        lo = c * chunk
        if b - a == chunk and out.dtype == array.dtype and out[a:b].flags.c_contiguous:
            _chunk_bytes(array, folder, stats, c, rel, into=out[a:b])     # a whole chunk: decoded in place
            return
        block = _chunk_bytes(array, folder, stats, c, rel)
        if b - a == min(chunk, array.shape[0] - lo):           # every row of the chunk: one copy
            out[a:b] = block[: b - a]
        elif block.dtype == out.dtype:
            np.take(block, rows[a:b] - lo, axis=0, out=out[a:b])
        else:
            out[a:b] = block[rows[a:b] - lo]

    return [lambda c=int(c), a=int(a), b=int(b): one(c, a, b) for c, a, b in zip(needed, bounds[0], bounds[1])]


# One pool of reader threads for the process, so that each thread's decoding buffer is made
# once (fresh memory is what made reads slow; a pool per call would make new threads, and new
# buffers, every time). A forked child starts without it.
_POOL: ThreadPoolExecutor | None = None
_POOL_NAME = "scdrugmap-read"


def _forget_pool() -> None:
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _run(tasks: list) -> None:
    """Run ``tasks`` (callables) on the reader pool; the first failure is raised after all end."""
    global _POOL
    if len(tasks) <= 1 or _READ_THREADS == 1 or threading.current_thread().name.startswith(_POOL_NAME):
        for task in tasks:              # nothing to share out, or already on a reader thread
            task()
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix=_POOL_NAME)
    futures = [_POOL.submit(task) for task in tasks]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def layout_mismatch(array, row) -> tuple[tuple, tuple] | None:
    """``(found, expected)`` (shape, dtype, chunk rows) when ``array`` is not laid out as its
    provenance ``row`` says, else None: a damaged or foreign ``zarr.json`` read as it stands
    would decode chunks with the wrong shape."""
    chunk_rows = row.get("chunk_rows")
    expected = ((int(row["n_cells"]), int(row["dim"])), str(row["dtype"]),
                int(chunk_rows) if chunk_rows is not None and chunk_rows == chunk_rows else int(array.chunks[0]))
    found = (tuple(array.shape), str(array.dtype), int(array.chunks[0]))
    return None if found == expected else (found, expected)


def check_array(array, rel: str) -> list[str]:
    """Every chunk of ``array`` read and checked (checksums where it has them); the problems found."""
    problems = []
    chunk = array.chunks[0]
    for c in range(-(-array.shape[0] // chunk)):
        lo, hi = c * chunk, min((c + 1) * chunk, array.shape[0])
        try:
            _read(array, lo, hi, rel)
        except ChunkError as e:
            problems.append(str(e).split(": re-extract")[0])
    return problems


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
    """A zarr Store wrapper that counts every byte read through it in an :class:`IOStats`.

    With ``strict`` (set once the array is known to have every chunk written), an absent
    chunk is a :class:`MissingChunk` instead of zarr's silent fill value.
    """

    def __init__(self, store, stats: IOStats, strict: list | None = None):
        super().__init__(store)
        self.stats = stats
        self.strict = strict if strict is not None else [False]     # shared by the copies zarr makes

    def _with_store(self, store):
        return type(self)(store, self.stats, self.strict)

    def _missing(self, key):
        if self.strict[0] and not key.endswith("zarr.json"):
            raise MissingChunk(key)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None:
            self._missing(key)
        else:
            self.stats.add(len(buf))
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buf in zip(key_ranges, bufs):
            if buf is None:
                self._missing(key)
            else:
                self.stats.add(len(buf))
        return bufs


def open_counted(inner, stats: IOStats, rel: str):
    """The array at ``rel`` of the zarr store ``inner``, read-only, its reads counted; strict about
    missing chunks when it was written with checksums."""
    root = CountingStore(inner, stats)
    array = zarr.open_array(store=root, path=rel, mode="r", zarr_format=3)
    root.strict[0] = is_checked(array)
    return array
