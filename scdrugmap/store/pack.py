"""Packing a store for another lab: a manifest with a sha256 per file; pack, verify, unpack.

A *pack* holds the files of a store plus ``manifest.json``, either as a directory (which is
itself an openable store) or as one tar archive, uncompressed (``.tar``) or zstd-compressed
(``.tar.zst``)::

    manifest.json                        # first member of a tar archive
    index.duckdb                         # a consistent snapshot of the index
    embeddings.zarr/<backbone>/<dataset>/<id>/...   # only the arrays provenance refers to
    models/...                           # e.g. the shared PCA fit

The manifest (docs/store-format.md) records the format and schema versions, the scdrugmap
version, the datasets and the full provenance, and the size and sha256 of every file. It
checks itself too: ``manifest_sha256`` is the sha256 of its own canonical JSON without that
field, and the file must be byte for byte that canonical JSON, so a change of any byte of any
file, or a missing or extra file, is found by :func:`verify` and named. :func:`unpack`
writes into a temporary sibling of the destination, checks every file against the manifest
as it goes, and moves it into place only when all match: a damaged pack leaves nothing behind.

Embedding chunks are already Blosc-lz4 compressed; zstd on top saves little on dense
foundation-model embeddings and more on sparse-ish baselines (``benchmarks/share_bench.py``),
so ``.tar`` is the plain choice and ``.tar.zst`` the smaller one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from .._version import __version__
from ..errors import UserError
from .schema import SCHEMA_VERSION
from .common import (EMBEDDINGS, INDEX, check_writable_dir, disk_error_or, is_url, local_path, now,
                     path_basename, strip_paths)
from .common import first_line as _first_line
from .locks import work_dir
from .store import Store

MANIFEST = "manifest.json"
FORMAT = "scdrugmap-store-pack"
FORMAT_VERSION = 1
BLOCK = 1 << 20
ZSTD_LEVEL = 1          # as small as level 3 on embedding chunks, 3x faster (benchmarks/share_bench.py)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MODELS = "models"
FINETUNE = "finetune"
KINDS = ("dir", "tar", "tar.zst")
_REFUSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip", ".gz", ".bz2", ".xz",
                     ".zst", ".7z")
MAX_LISTED = 10


# ---- manifest ------------------------------------------------------------------------------
def _canonical(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode()


def manifest_digest(manifest: dict) -> str:
    """The sha256 of ``manifest.json`` as written: the one value a sender publishes (apart from the
    pack) so that a receiver can tell the pack is the one sent (``store verify --expect``)."""
    return hashlib.sha256(encode_manifest(manifest)).hexdigest()


def encode_manifest(manifest: dict) -> bytes:
    """The manifest's bytes, with its own checksum (``manifest_sha256``) filled in."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _canonical({**body, "manifest_sha256": hashlib.sha256(_canonical(body)).hexdigest()})


def _safe_rel(rel) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or rel == MANIFEST:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def parse_manifest(raw: bytes, where) -> dict:
    """Check and parse a manifest; a clear error naming ``manifest.json`` if any byte is off."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{where}: {MANIFEST} is corrupt (not valid JSON: {_first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{where} is not a scdrugmap pack ({MANIFEST} is not a scdrugmap manifest)")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != hashlib.sha256(_canonical(body)).hexdigest():
        raise UserError(f"{where}: {MANIFEST} was modified (its checksum differs)")
    if _canonical(manifest) != raw:
        raise UserError(f"{where}: {MANIFEST} was modified (it is not byte for byte as scdrugmap wrote it)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{where} is a pack of format version {version}, newer than version {FORMAT_VERSION} that "
                        f"this scdrugmap ({__version__}) reads: upgrade scdrugmap")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(_safe_rel(rel) and isinstance(e, dict) and
                                              isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                                              for rel, e in files.items()):
        raise UserError(f"{where}: {MANIFEST} lists invalid file entries")
    return manifest


def _check_schema(manifest: dict, where) -> None:
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{where} holds a store of schema version {version}, newer than version {SCHEMA_VERSION} "
                        f"that this scdrugmap ({__version__}) reads: upgrade scdrugmap (pip install -U scdrugmap)")


def _jsonable(value):
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if value != value else value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _rows(con, query: str) -> list[dict]:
    cur = con.execute(query)
    names = [d[0] for d in cur.description]
    return [{n: _jsonable(v) for n, v in zip(names, row)} for row in cur.fetchall()]


def index_summary(index_path) -> dict:
    """Datasets, provenance (params parsed) and counts of an index file, JSON-ready."""
    with duckdb.connect(str(index_path), read_only=True) as con:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        datasets = _rows(con, "SELECT dataset, n_cells, n_sensitive, n_resistant, drug, cancer_type, tissue, "
                              "source_sha256 FROM datasets ORDER BY dataset")
        provenance = _rows(con, "SELECT * FROM provenance ORDER BY backbone, dataset")
        n_runs = con.execute("SELECT count(*) FROM probe_runs").fetchone()[0]
    for row in provenance:
        with contextlib.suppress(TypeError, ValueError):
            row["params"] = json.loads(row["params"])
    return {"schema_version": int(meta.get("schema_version", 0)), "store_created_by": meta.get("created_by"),
            "store_created_at": meta.get("created_at"), "datasets": datasets, "provenance": provenance,
            "n_cells": sum(d["n_cells"] for d in datasets), "probe_runs": int(n_runs)}


# ---- stripping local paths -----------------------------------------------------------------
def _strip_json(text: str | None) -> str | None:
    try:
        obj = json.loads(text)
    except (TypeError, ValueError):
        return text
    stripped = strip_paths(obj)
    return text if stripped == obj else json.dumps(stripped, sort_keys=True)


def strip_index_paths(index_path, dest) -> None:
    """Copy the index at ``index_path`` to ``dest`` with local file paths reduced to file names.

    ``datasets.source_path`` keeps the file name only, and so does every absolute path in the
    ``params`` JSON of provenance and probe runs. The copy is rewritten table by table
    (``COPY FROM DATABASE``), so the old values do not survive in free blocks of the file.
    """
    with duckdb.connect(str(index_path)) as con:
        for dataset, path in con.execute("SELECT dataset, source_path FROM datasets").fetchall():
            con.execute("UPDATE datasets SET source_path = ? WHERE dataset = ?", [path_basename(path), dataset])
        for table, keys in (("provenance", ("backbone", "dataset")), ("probe_runs", ("run_id",))):
            for *key, params in con.execute(f"SELECT {', '.join(keys)}, params FROM {table}").fetchall():
                new = _strip_json(params)
                if new != params:
                    cond = " AND ".join(f"{k} = ?" for k in keys)
                    con.execute(f"UPDATE {table} SET params = ? WHERE {cond}", [new, *key])
        # saved heads (scdrugmap fit) keep their training datasets' provenance rows, params as JSON text
        has_models = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'models'").fetchone()[0]
        for name, provenance in con.execute("SELECT name, provenance FROM models").fetchall() if has_models else []:
            try:
                rows = json.loads(provenance)
                new = json.dumps({d: {**r, "params": _strip_json(r.get("params"))} for d, r in rows.items()},
                                 sort_keys=True)
            except (TypeError, ValueError, AttributeError):
                continue
            if new != provenance:
                con.execute("UPDATE models SET provenance = ? WHERE name = ?", [new, name])
    with duckdb.connect() as con:
        con.execute("ATTACH ? AS src (READ_ONLY)", [str(index_path)])
        con.execute("ATTACH ? AS dst", [str(dest)])
        con.execute("COPY FROM DATABASE src TO dst")
        con.execute("DETACH dst")
        con.execute("DETACH src")


def check_destination(path: Path, what: str) -> None:
    """A one-line error unless ``path`` can be created: its nearest existing folder must be writable."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    check_writable_dir(folder, what)


def _make_parent(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders; returns them, so a failure can remove them."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


# ---- packing -------------------------------------------------------------------------------
@dataclass
class PackReport:
    out: Path
    kind: str
    n_files: int
    n_bytes: int            # bytes of the store's files (before any compression)
    out_bytes: int          # bytes of the pack as written
    seconds: float
    manifest: dict
    digest: str             # sha256 of manifest.json: publish it beside the pack


def pack_kind(out) -> str:
    """'tar' (.tar), 'tar.zst' (.tar.zst, .tzst) or 'dir' (anything else) for an output path."""
    name = str(out).lower()
    if name.endswith((".tar.zst", ".tzst")):
        return "tar.zst"
    if name.endswith(".tar"):
        return "tar"
    if name.endswith(_REFUSED_SUFFIXES):
        raise UserError(f"{out}: unsupported archive type: name the pack .tar or .tar.zst, or give a directory")
    return "dir"


def _store_files(store: Store, index_copy: Path, provenance: list[dict]) -> list[tuple[str, Path]]:
    files = [(INDEX, index_copy)]
    for row in provenance:
        root = store.embeddings_path / row["array_path"]
        if not root.is_dir():
            raise UserError(f"embedding array {row['array_path']} ({row['backbone']} x {row['dataset']}) is missing "
                            f"from {store.path}: the store is damaged; re-extract it (--force) before packing")
        for p in sorted(root.rglob("*")):
            if p.is_file():
                files.append((f"{EMBEDDINGS}/{row['array_path']}/{p.relative_to(root).as_posix()}", p))
    for folder in (MODELS, FINETUNE):           # model fits; fine-tuning folds (adapters, heads, splits)
        root = store.path / folder
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root).as_posix()
                if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):   # no work files
                    files.append((f"{folder}/{rel}", p))
    return files


def _hash_file(path: Path, sink=None) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            h.update(chunk)
            n += len(chunk)
            if sink is not None:
                sink.write(chunk)
    return h.hexdigest(), n


def _snapshot_index(store: Store, dest: Path, strip: bool) -> None:
    """A consistent copy of the index, made without writing to the store: no writer can change
    it while it is copied, and a write-ahead log left beside it (a writer whose final checkpoint
    the disk refused) is copied too and folded into the copy, not into the store's file."""
    tmp = dest.with_name(dest.name + ".copy")
    wal, tmp_wal = store.index_path.with_name(INDEX + ".wal"), tmp.with_name(tmp.name + ".wal")
    with store.connect(read_only=True):                  # holds the lock: writers wait for the copy
        shutil.copyfile(store.index_path, tmp)
        if wal.exists():
            shutil.copyfile(wal, tmp_wal)
    if tmp_wal.exists():
        with duckdb.connect(str(tmp)) as con:            # replays the log into the copy
            con.execute("CHECKPOINT")
        tmp_wal.unlink(missing_ok=True)
    if strip:
        strip_index_paths(tmp, dest)
        tmp.unlink()
    else:
        os.replace(tmp, dest)


def _check_out(out: Path, store_path: Path, kind: str) -> None:
    if out.exists() and not (kind == "dir" and out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{out} exists: choose a new path for the pack")
    resolved, root = out.resolve(), store_path.resolve()
    if resolved == root or root in resolved.parents:
        raise UserError(f"{out} is inside the store {store_path}: write the pack elsewhere")


def _tar_info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(store_path, out, strip_paths: bool = False, zstd_level: int = ZSTD_LEVEL) -> PackReport:
    """Write the store at ``store_path`` as a pack at ``out`` (a directory, ``.tar`` or ``.tar.zst``)."""
    if is_url(store_path):
        raise UserError(f"{store_path} is a URL: pack needs a local store directory")
    t0 = time.perf_counter()
    if is_url(out):
        raise UserError(f"{out} is a URL: write the pack to a local path, then upload it")
    store = Store.open(store_path)
    out = local_path(out)
    kind = pack_kind(out)
    _check_out(out, store.path, kind)
    check_destination(out, "the pack")
    if kind == "tar.zst":
        zstandard = _zstandard()
    created = _make_parent(out)
    try:
        with work_dir(out, "packing") as work:
            index_copy = work / INDEX
            _snapshot_index(store, index_copy, strip_paths)
            summary = index_summary(index_copy)
            files = _store_files(store, index_copy, summary["provenance"])
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "scdrugmap_version": __version__,
                        "created_at": now().isoformat(timespec="seconds"), "paths_stripped": bool(strip_paths),
                        **summary}
            entries = {}
            if kind == "dir":
                tree = work / "tree"
                for rel, path in files:
                    target = tree / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as f:
                        digest, size = _hash_file(path, sink=f)
                    entries[rel] = {"sha256": digest, "size": size}
                manifest["files"] = entries
                manifest["total_bytes"] = sum(e["size"] for e in entries.values())
                raw = encode_manifest(manifest)
                (tree / MANIFEST).write_bytes(raw)
                if out.exists():
                    out.rmdir()
                os.replace(tree, out)
                out_bytes = manifest["total_bytes"] + len(raw)
            else:
                stats = {}
                for rel, path in files:                      # pass 1: hashes, so the manifest can go first
                    digest, size = _hash_file(path)
                    entries[rel] = {"sha256": digest, "size": size}
                    st = path.stat()
                    stats[rel] = (st.st_size, st.st_mtime_ns)
                manifest["files"] = entries
                manifest["total_bytes"] = sum(e["size"] for e in entries.values())
                raw = encode_manifest(manifest)
                mtime = int(time.time())
                part = work / "pack.part"
                with open(part, "wb") as fh:
                    sink = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True).stream_writer(
                        fh, closefd=False) \
                        if kind == "tar.zst" else fh
                    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=BLOCK) as tar:
                        tar.copybufsize = BLOCK
                        tar.addfile(_tar_info(MANIFEST, len(raw), mtime), io.BytesIO(raw))
                        for rel, path in files:               # pass 2: the bytes, checked unchanged
                            st = path.stat()
                            if (st.st_size, st.st_mtime_ns) != stats[rel]:
                                raise UserError(f"{rel} changed while the store was being packed: pack again when no "
                                                "command is writing to the store")
                            with open(path, "rb") as f:
                                tar.addfile(_tar_info(rel, st.st_size, mtime), f)
                    if sink is not fh:
                        sink.close()
                out_bytes = part.stat().st_size
                os.replace(part, out)
    except BaseException as e:
        _remove_empty(created)
        raise disk_error_or(e, out, "writing the pack")
    return PackReport(out, kind, len(entries), manifest["total_bytes"], out_bytes, time.perf_counter() - t0, manifest,
                      manifest_digest(manifest))


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise UserError(".tar.zst packs need the zstandard package: pip install zstandard") from None
    return zstandard


# ---- reading packs -------------------------------------------------------------------------
@dataclass
class VerifyReport:
    path: Path
    kind: str
    manifest: dict
    n_files: int = 0
    n_bytes: int = 0
    seconds: float = 0.0
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest)

    def summary(self) -> str:
        listed = "; ".join(self.problems[:MAX_LISTED])
        more = f"; and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
        return f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}: {listed}{more}"


class _Checker:
    """Compares members, as they are read, with the manifest's files."""

    def __init__(self, manifest: dict):
        self.expected = manifest["files"]
        self.seen: set[str] = set()
        self.problems: list[str] = []
        self.n_bytes = 0

    def member(self, rel: str, reader, sink_for=None) -> None:
        if rel == MANIFEST or rel in self.seen:
            self.problems.append(f"{rel}: appears twice")
            return
        if rel not in self.expected:
            self.problems.append(f"{rel}: extra file, not in the manifest")
            return
        self.seen.add(rel)
        if reader is None:
            self.problems.append(f"{rel}: not a regular file")
            return
        h, n = hashlib.sha256(), 0
        sink = sink_for(rel) if sink_for else None
        try:
            while chunk := reader.read(BLOCK):
                h.update(chunk)
                n += len(chunk)
                if sink is not None:
                    sink.write(chunk)
        finally:
            if sink is not None:
                sink.close()
        self.n_bytes += n
        want = self.expected[rel]
        if n != want["size"]:
            self.problems.append(f"{rel}: {n:,} bytes where the manifest says {want['size']:,}")
        elif h.hexdigest() != want["sha256"]:
            self.problems.append(f"{rel}: content differs from the manifest (sha256)")

    def finish(self, truncated: str | None = None) -> None:
        if truncated:
            self.problems.append(truncated)
        for rel in sorted(set(self.expected) - self.seen):
            self.problems.append(f"{rel}: missing")


def source_kind(path: Path) -> str:
    if path.is_dir():
        return "dir"
    with open(path, "rb") as f:
        return "tar.zst" if f.read(4) == ZSTD_MAGIC else "tar"


def _check_source(path) -> Path:
    if is_url(path):
        raise UserError(f"{path} is a URL: verify and unpack read a local pack (download it first)")
    path = local_path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a pack (.tar, .tar.zst or a directory with {MANIFEST})")
    if path.is_dir() and not (path / MANIFEST).is_file():
        raise UserError(f"{path} has no {MANIFEST}: it is not a pack (make one with 'scdrugmap store pack')")
    return path


@contextlib.contextmanager
def _tar_members(path: Path, kind: str):
    """Yields an iterator of ``(name, reader or None)`` over the archive's members, in order."""
    with open(path, "rb") as raw:
        # a plain .tar is read in random-access mode (3x faster than tarfile's stream mode);
        # a .tar.zst can only be streamed
        stream = _zstandard().ZstdDecompressor().stream_reader(raw, read_size=BLOCK) if kind == "tar.zst" else raw
        try:
            tar = tarfile.open(fileobj=stream, mode="r|" if kind == "tar.zst" else "r:", bufsize=BLOCK)
        except _read_errors() as e:
            raise UserError(f"{path} is not a readable tar archive ({_first_line(e)}): give a pack made by "
                            "'scdrugmap store pack'") from None

        def members():
            for m in tar:
                yield m.name, (tar.extractfile(m) if m.isfile() else None)

        try:
            yield members()
        finally:
            tar.close()


def _read_errors():
    errors = (tarfile.TarError, OSError, EOFError)
    with contextlib.suppress(ImportError):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def _manifest_from(first, path: Path) -> dict:
    name, reader = first
    if name != MANIFEST or reader is None:
        raise UserError(f"{path} is not a scdrugmap pack (its first member is {name!r}, not {MANIFEST})")
    return parse_manifest(reader.read(), path)


def read_manifest(path) -> dict:
    """The checked manifest of a pack (a directory, or an archive: only its first member is read)."""
    path = _check_source(path)
    kind = source_kind(path)
    if kind == "dir":
        return parse_manifest((path / MANIFEST).read_bytes(), path)
    with _tar_members(path, kind) as members:
        try:
            first = next(members, None)
        except _read_errors() as e:
            raise UserError(f"{path} is not a readable archive ({_first_line(e)})") from None
        if first is None:
            raise UserError(f"{path} is an empty archive, not a scdrugmap pack")
        return _manifest_from(first, path)


def _dir_files(path: Path):
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if rel == MANIFEST or (p.is_dir() and not p.is_symlink()):
            continue
        yield rel, p


def _walk(path: Path, kind: str, sink_for=None) -> tuple[dict, _Checker]:
    """Read every member of the pack at ``path`` through a checker (and into ``sink_for(rel)``)."""
    if kind == "dir":
        manifest = parse_manifest((path / MANIFEST).read_bytes(), path)
        checker = _Checker(manifest)
        for rel, p in _dir_files(path):
            if p.is_symlink() or not p.is_file():
                checker.member(rel, None)
                continue
            with open(p, "rb") as f:           # an extra or repeated file is reported, not read
                checker.member(rel, f, sink_for)
        checker.finish()
        return manifest, checker
    with _tar_members(path, kind) as members:
        checker, truncated = None, None
        try:
            first = next(members, None)
            if first is None:
                raise UserError(f"{path} is an empty archive, not a scdrugmap pack")
            manifest = _manifest_from(first, path)
            if sink_for is not None:
                _check_schema(manifest, path)     # before anything is written
            checker = _Checker(manifest)
            for name, reader in members:
                checker.member(name, reader, sink_for)
        except _read_errors() as e:
            if checker is None:
                raise UserError(f"{path} is not a readable archive ({_first_line(e)})") from None
            truncated = f"the archive is truncated or damaged after {len(checker.seen)} files ({_first_line(e)})"
        checker.finish(truncated)
        return manifest, checker


def verify(path, expect: str | None = None) -> VerifyReport:
    """Check every file of a pack (or of a store unpacked from one) against its manifest.

    The manifest checks itself, so this finds damage, not tampering: someone who rewrites a pack
    can rewrite its manifest too. ``expect``, the manifest digest the sender published
    (:func:`manifest_digest`, printed by ``store pack``), closes that gap: a pack whose manifest
    differs from the one sent fails."""
    t0 = time.perf_counter()
    path = _check_source(path)
    if expect is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expect.strip()):
        raise UserError(f"--expect {expect!r} is not a sha256 digest (64 hexadecimal digits, as printed by "
                        "'scdrugmap store pack')")
    kind = source_kind(path)
    manifest, checker = _walk(path, kind)
    report = VerifyReport(path, kind, manifest, len(checker.seen), checker.n_bytes, time.perf_counter() - t0,
                          checker.problems)
    if expect is not None and report.digest != expect.strip().lower():
        report.problems.insert(0, f"{MANIFEST}: its sha256 is {report.digest}, not the expected {expect.strip()} "
                                  "(this is not the pack that was published)")
    return report


@dataclass
class UnpackReport:
    dest: Path
    n_files: int
    n_bytes: int
    seconds: float
    manifest: dict
    migrated: list


def unpack(src, dest) -> UnpackReport:
    """Verify the pack at ``src`` while copying it into ``dest``; ``dest`` appears only if all is well."""
    t0 = time.perf_counter()
    src = _check_source(src)
    if is_url(dest):
        raise UserError(f"{dest} is a URL: unpack into a local directory")
    dest = local_path(dest)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise UserError(f"{dest} exists and is not empty: unpack into a new or empty directory")
    kind = source_kind(src)
    if kind == "dir":                      # refuse a newer schema before writing anything
        _check_schema(parse_manifest((src / MANIFEST).read_bytes(), src), src)
    check_destination(dest, "the unpacked store")
    created = _make_parent(dest)
    try:
        with work_dir(dest, "unpacking") as staging:
            def sink_for(rel: str):
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                return open(target, "wb")

            manifest, checker = _walk(src, kind, sink_for)
            if checker.problems:
                problems = VerifyReport(src, kind, manifest, problems=checker.problems).summary()
                raise UserError(f"{src} failed verification, nothing was unpacked: {problems}")
            (staging / MANIFEST).write_bytes(encode_manifest(manifest))
            (staging / EMBEDDINGS).mkdir(exist_ok=True)
            if dest.exists():
                dest.rmdir()
            os.replace(staging, dest)
    except BaseException as e:
        _remove_empty(created)
        raise disk_error_or(e, dest, "unpacking")
    store = Store.open(dest)              # migrates a pack of an older schema version
    return UnpackReport(dest, len(checker.seen), checker.n_bytes, time.perf_counter() - t0, manifest,
                        [m.description for m in store.migrated])
