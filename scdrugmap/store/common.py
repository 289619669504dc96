"""Small helpers shared by the store modules: locations, timestamps, error text, disk errors,
file checksums.

Imports nothing heavy (no numpy, pandas, duckdb or zarr), so any module can use it without
pulling in the rest of the store, and without import circles.
"""

from __future__ import annotations

import errno
import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError

INDEX = "index.duckdb"
EMBEDDINGS = "embeddings.zarr"
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# errno values that mean "the disk cannot take this write" rather than a bug
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}
# the same conditions as DuckDB words them (it raises its own exception types, not OSError)
_DUCKDB_DISK_WORDS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                      "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """The sha256 of a file, read in blocks (source files and arrays may be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


def looks_like_local_path(value: str) -> bool:
    return "\n" not in value and (value.startswith(("/", "~", "\\\\")) or bool(_WINDOWS_PATH.match(value)))


def path_basename(value: str) -> str:
    return re.split(r"[\\/]", value.rstrip("/\\"))[-1]


def strip_paths(obj):
    """``obj`` (JSON-like) with every local file path reduced to its file name: what 'store pack
    --strip-paths' writes, and how provenance parameters are compared (the same checkpoint in
    another folder is the same checkpoint)."""
    if isinstance(obj, str):
        return path_basename(obj) if looks_like_local_path(obj) else obj
    if isinstance(obj, list):
        return [strip_paths(v) for v in obj]
    if isinstance(obj, dict):
        return {k: strip_paths(v) for k, v in obj.items()}
    return obj


def is_url(path) -> bool:
    """True for 's3://...', 'https://...' and other fsspec URLs (a 'file://' URL is a local path)."""
    m = _URL_RE.match(path) if isinstance(path, str) else None
    return bool(m) and m.group(1).lower() != "file"


def local_path(path) -> Path:
    """``path`` as a local Path ('file://' stripped)."""
    if isinstance(path, str) and path.lower().startswith("file://"):
        path = path[len("file://"):]
    return Path(path)


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (DuckDB's span several), or its type's name."""
    text = " ".join(str(err).split("\n")[:1]).strip()
    return text or type(err).__name__


def mb(n: int) -> str:
    return f"{n:,} B" if n < 1e6 else f"{n / 1e6:,.2f} MB"


def disk_errno(err: BaseException) -> int | None:
    """The errno when ``err`` says a disk refused a write (full, read-only, no permission), else None.

    Looks through ``__cause__``/``__context__`` too: zarr and DuckDB wrap the OS error.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err.errno
        if type(err).__module__.startswith(("duckdb", "_duckdb")):
            for words, code in _DUCKDB_DISK_WORDS.items():
                if words in str(err):
                    return code
        err = err.__cause__ or err.__context__
    return None


class DiskError(UserError):
    """A write refused by the disk (full, read-only, no permission): see :func:`disk_errno`.

    Raised after what was written has been rolled back; like any :class:`UserError` the CLI
    prints it as one line with exit code 2.
    """

    def __init__(self, code: int, where, what: str):
        self.errno, self.where, self.what = code, where, what
        super().__init__(f"{DISK_ERRNOS.get(code, 'the disk refused the write')} while {what} ({where}): "
                         + _fix(code))


def _fix(code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space there, then run the command again (the failed write was undone)"
    if code == errno.EROFS:
        return "the location is mounted read-only: copy the store to a writable place, or remount it read-write"
    return "check the permissions of that location, or use a copy you can write (the failed write was undone)"


def check_writable_dir(folder, what: str) -> None:
    """A one-line error unless a file can be created in ``folder`` (an existing directory):
    outputs are checked before any work, so a bad destination costs nothing."""
    import os
    import uuid

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder {folder} does not exist: create it first, or choose another location for {what}")
    probe = folder / f".scdrugmap-write-test-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:
        reason = DISK_ERRNOS.get(e.errno) or (e.strerror or str(e)).lower()
        raise UserError(f"cannot write {what} in {folder} ({reason}): choose a location you can write") from None
    os.unlink(probe)


def disk_error_or(err: BaseException, where, what: str) -> BaseException:
    """``err`` as a :class:`DiskError` when a disk refused a write, else ``err`` itself (re-raise it)."""
    code = disk_errno(err)
    if code is None or isinstance(err, UserError):
        return err
    return DiskError(code, where, what)
