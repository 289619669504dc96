"""``scdrugmap store verify DIR`` on a store that was never packed: every byte that has a
checksum of its own is read and checked.

* ``index.duckdb``: every table is read in full; DuckDB checks each block's checksum as it
  reads, so a damaged block is found (and named) here rather than in the middle of a probe.
* every embedding array the index refers to: present, its ``zarr.json`` readable and agreeing
  with ``provenance`` (shape, dtype, chunking), and every chunk read, its CRC-32C checked
  (arrays written before checksums existed can only be decoded, and are listed as such).
* ``models/*.npz`` (e.g. the PCA fit): every member read, its zip CRC-32 checked.
* every saved head (``models`` table, ``scdrugmap fit``): its manifest has the sha256 the index
  recorded, and every file of the head the size and sha256 of the manifest (:mod:`.heads`).

What this proves is that nothing was damaged since it was written: it does not prove who
wrote it. For that, verify a pack against the manifest digest its sender published
(``store verify PACK --expect SHA256``; see :mod:`.pack`).
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np

from ..errors import UserError
from . import arrays
from .common import EMBEDDINGS, INDEX, first_line
from .heads import HEADS_DIR, check_head_folder
from .store import Store

MAX_LISTED = 10


@dataclass
class StoreCheck:
    path: Path
    n_files: int = 0
    n_bytes: int = 0
    seconds: float = 0.0
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        listed = "; ".join(self.problems[:MAX_LISTED])
        more = f"; and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
        return f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}: {listed}{more}"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _check_index(store: Store, report: StoreCheck) -> bool:
    try:
        with store.connect() as con:
            tables = [r[0] for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()]
            for table in tables:
                con.execute(f'SELECT count(*), sum(hash(COLUMNS(*))) FROM "{table}"').fetchall()  # every value read
    except UserError as e:
        report.problems.append(f"{INDEX}: {str(e).split(': restore')[0]}")
        return False
    except duckdb.Error as e:
        report.problems.append(f"{INDEX}: unreadable ({first_line(e)})")
        return False
    report.n_files += 1
    report.n_bytes += store.index_path.stat().st_size
    return True


def _check_arrays(store: Store, report: StoreCheck) -> None:
    unchecked = []
    for row in store.provenance().to_dict("records"):
        rel, where = row["array_path"], f"{row['backbone']} x {row['dataset']}"
        try:
            arr = store.open_array(rel)
        except arrays.ArrayMissing:
            report.problems.append(f"{EMBEDDINGS}/{rel} ({where}): missing")
            continue
        except UserError as e:
            report.problems.append(str(e).split(": re-extract")[0])
            continue
        mismatch = arrays.layout_mismatch(arr, row)
        if mismatch:
            found, expected = mismatch
            report.problems.append(f"{EMBEDDINGS}/{rel} ({where}): shape, dtype and chunks {found} where the index "
                                   f"says {expected}")
            continue
        report.problems.extend(arrays.check_array(arr, rel))
        if not arrays.is_checked(arr):
            unchecked.append(where)
        report.n_files += sum(1 for p in (store.embeddings_path / rel).rglob("*") if p.is_file())
        report.n_bytes += _size(store.embeddings_path / rel)
    if unchecked:
        report.notes.append(f"{len(unchecked)} array(s) were written without chunk checksums (by an older scdrugmap) "
                            f"and could only be decoded: {', '.join(unchecked[:5])}"
                            + (" ..." if len(unchecked) > 5 else "") + "; re-extract (--force) to add them")


def _check_models(store: Store, report: StoreCheck) -> None:
    """The fitted baseline models' arrays (models/<backbone>/...); saved heads are :func:`_check_heads`'s."""
    folder = store.path / "models"
    for path in sorted(folder.rglob("*.npz")) if folder.is_dir() else []:
        rel = path.relative_to(store.path).as_posix()
        if rel.startswith(HEADS_DIR + "/"):
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                for key in data.files:
                    data[key]
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            report.problems.append(f"{rel}: damaged ({first_line(e)})")
            continue
        report.n_files += 1
        report.n_bytes += path.stat().st_size


def _check_heads(store: Store, report: StoreCheck) -> None:
    with store.connect() as con:
        try:
            rows = con.execute("SELECT name, folder, manifest_sha256 FROM models ORDER BY name").fetchall()
        except duckdb.CatalogException:             # an index from before the models table (migrated on open)
            rows = []
    known = set()
    for name, folder, digest in rows:
        known.add(folder)
        manifest, problems = check_head_folder(store.path, folder, digest)
        report.problems.extend(f"model {name!r}: {p}" for p in problems)
        if manifest is not None and not problems:
            report.n_files += 1 + len(manifest["files"])
            report.n_bytes += _size(store.path / folder)
    root = store.path / HEADS_DIR
    stray = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")
                   and f"{HEADS_DIR}/{p.name}" not in known) if root.is_dir() else []
    if stray:
        report.notes.append(f"{len(stray)} folder(s) under {HEADS_DIR}/ belong to no model in the index "
                            f"({', '.join(stray[:5])}): left over from an interrupted 'scdrugmap fit'; they are "
                            "never read")


def verify_store(path) -> StoreCheck:
    """Check every checksummed byte of the store at ``path`` (see the module docstring)."""
    t0 = time.perf_counter()
    path = Path(path)
    report = StoreCheck(path)
    # not Store.open: a damaged index is a finding here, and verifying must not migrate (write) anything
    store = Store(path)
    if not store.index_path.is_file():
        raise UserError(f"{path} is not a scdrugmap store (no {INDEX}) and holds no pack manifest: give a store or "
                        "a pack")
    if _check_index(store, report):
        _check_arrays(store, report)
        _check_heads(store, report)
    _check_models(store, report)
    finetune = store.path / "finetune"
    if finetune.is_dir():
        n = sum(1 for p in finetune.rglob("*") if p.is_file())
        report.notes.append(f"{n} fine-tuning file(s) under finetune/ have no checksums of their own: a pack of the "
                            "store covers them (sha256 per file)")
    report.seconds = time.perf_counter() - t0
    return report
