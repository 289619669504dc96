"""What killed or failed commands leave in a store, and how it is undone or reclaimed.

* A write the disk refuses (full, read-only) is rolled back where it happened
  (:func:`disk_rollback`), so the store is as it was before the command.
* An extraction killed mid-way leaves its staging directory: the next extraction of that
  backbone resumes it. One killed after its array was moved into place but before the index
  pointed at it is committed by the next run without recomputing (see :mod:`.arrays`).
* Arrays no provenance row refers to (a run killed between replacing an array and deleting
  the old one, or stores written by older versions) are removed by the next extraction of that
  backbone, under its job lock (:func:`reclaim`).
* ``scdrugmap store info`` lists all of these, with their sizes (:func:`reclaimable`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from ..errors import UserError
from . import arrays, locks
from .common import DiskError, disk_errno


@contextlib.contextmanager
def disk_rollback(staged: arrays.StagedArray, where, what: str):
    """Run the block; when the disk refuses a write, undo what ``staged`` got from this run and
    raise a one-line :class:`~.common.DiskError` (other failures keep the staging: it resumes)."""
    try:
        yield
    except BaseException as e:
        code = disk_errno(e)
        if code is None or isinstance(e, UserError):
            raise
        staged.rollback()
        raise DiskError(code, where, what) from None


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _staging_dirs(store, backbone: str | None = None) -> list[Path]:
    root = store.embeddings_path / arrays.STAGING
    if not root.is_dir():
        return []
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if backbone is None:
        return dirs
    mine = arrays.safe_name(backbone)
    return [p for p in dirs if (arrays.staging_pair(p) or (None,))[0] == mine]


def _final_of(staging: Path) -> str | None:
    marker = staging / arrays.FINAL
    return marker.read_text().strip() if marker.is_file() else None


def _array_dirs(store, backbone_dir: Path) -> list[str]:
    """Relative paths ``<backbone>/<dataset>/<id>`` of the arrays under one backbone's folder."""
    root = store.embeddings_path
    return sorted(p.relative_to(root).as_posix() for p in backbone_dir.glob("*/*") if p.is_dir())


def _orphans(store, backbone_dirs, referenced: set[str], claimed: set[str]) -> list[str]:
    return [rel for d in backbone_dirs for rel in _array_dirs(store, d) if rel not in referenced | claimed]


def reclaim(store, backbone: str) -> list[str]:
    """Remove ``backbone``'s arrays that nothing refers to, and staging whose array was committed.
    Call only under the backbone's job lock. Returns what was removed."""
    referenced = set(store.provenance(backbone)["array_path"])
    removed, claimed = [], set()
    for staging in _staging_dirs(store, backbone):
        final = _final_of(staging)
        if final in referenced:                 # committed, then killed before the cleanup
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging.relative_to(store.path).as_posix())
        elif final:
            claimed.add(final)                   # finished, not yet committed: this run commits it
    folder = store.embeddings_path / arrays.safe_name(backbone)
    for rel in _orphans(store, [folder] if folder.is_dir() else [], referenced, claimed):
        shutil.rmtree(store.embeddings_path / rel, ignore_errors=True)
        removed.append(f"{store.embeddings_path.name}/{rel}")
    return removed


def reclaimable(store) -> dict:
    """What ``store info`` reports: unreferenced arrays, interrupted extractions, stale work folders."""
    prov = store.provenance()
    referenced = set(prov["array_path"])
    running = set(locks.running_jobs(store.path))
    interrupted, claimed = [], set()
    for staging in _staging_dirs(store):
        final = _final_of(staging)
        if final:
            claimed.add(final)
        job = {}
        with contextlib.suppress(OSError, ValueError):
            job = json.loads((staging / "job.json").read_text())
        n_rows, chunk_rows = int(job.get("n_rows", 0)), int(job.get("chunk_rows", 1) or 1)
        done = staging / "done"
        n_done = -(-n_rows // chunk_rows) if final else (len(list(done.iterdir())) if done.is_dir() else 0)
        interrupted.append({
            "backbone": job.get("backbone"), "dataset": job.get("dataset"), "chunks_done": n_done,
            "chunks": -(-n_rows // chunk_rows), "bytes": _bytes(staging) + (_bytes(store.embeddings_path / final)
                                                                          if final else 0),
            "running": f"extract-{arrays.safe_name(str(job.get('backbone')))}" in running,
            "path": staging.relative_to(store.path).as_posix()})
    backbone_dirs = [d for d in sorted(store.embeddings_path.iterdir())
                     if d.is_dir() and d.name != arrays.STAGING] if store.embeddings_path.is_dir() else []
    orphans = [{"path": f"{store.embeddings_path.name}/{rel}", "bytes": _bytes(store.embeddings_path / rel)}
               for rel in _orphans(store, backbone_dirs, referenced, claimed)]
    stale = [{"path": str(p), "bytes": _bytes(p)} for p in locks.stale_work_dirs(store.path.parent, store.path.name)]
    return {"unreferenced_arrays": orphans, "interrupted_extractions": interrupted, "stale_work_folders": stale,
            "running_jobs": sorted(running),
            "bytes": sum(x["bytes"] for x in orphans + stale) + sum(x["bytes"] for x in interrupted
                                                                     if not x["running"])}
