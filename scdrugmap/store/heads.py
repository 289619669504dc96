"""Saved heads' files (``scdrugmap fit``): ``models/heads/<folder>/`` with a ``manifest.json``.

A head folder holds data only (arrays in ``.npz`` read with ``allow_pickle=False``, LightGBM's
text model) and ``manifest.json``, which lists every file with its size and sha256. The index
row of the model (table ``models``) holds the sha256 of the manifest, so a change of any byte
of any file of the head is found, by ``scdrugmap store verify`` and before every prediction.
This module only reads and checks files; building a head from them is :mod:`scdrugmap.inference`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .common import sha256_file

HEADS_DIR = "models/heads"
MANIFEST = "manifest.json"
FORMAT = "scdrugmap-head"
FORMAT_VERSION = 1


def encode_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode()


def check_head_folder(store_root: Path, folder: str, manifest_sha256: str) -> tuple[dict | None, list[str]]:
    """``(manifest, problems)`` for the head folder ``folder`` (relative to the store): the manifest
    must have the sha256 the index recorded, and every file it lists its size and sha256; a file
    it does not list is a problem too (nothing unlisted is ever read, but a store carries only
    what it can vouch for)."""
    root = Path(store_root) / folder
    path = root / MANIFEST
    if not path.is_file():
        return None, [f"{folder}/{MANIFEST}: missing"]
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest_sha256:
        return None, [f"{folder}/{MANIFEST}: modified (its sha256 differs from the one in the index)"]
    try:
        manifest = json.loads(raw.decode("utf-8"))
        files = manifest["files"]
        assert manifest.get("format") == FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError):
        return None, [f"{folder}/{MANIFEST}: not a scdrugmap head manifest"]
    problems = []
    for name, entry in sorted(files.items()):
        if "/" in name or name in ("", ".", "..", MANIFEST):
            problems.append(f"{folder}/{MANIFEST}: invalid file name {name!r}")
            continue
        file = root / name
        if not file.is_file():
            problems.append(f"{folder}/{name}: missing")
        elif file.stat().st_size != entry.get("size") or sha256_file(file) != entry.get("sha256"):
            problems.append(f"{folder}/{name}: modified (its sha256 differs from the manifest's)")
    extra = sorted(p.name for p in root.iterdir() if p.name != MANIFEST and p.name not in files)
    problems.extend(f"{folder}/{name}: not listed in its manifest" for name in extra)
    return manifest, problems
