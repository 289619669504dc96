"""How several scdrugmap commands share one store: nothing lost, nothing half-written, no traceback.

* **The index** is guarded by DuckDB's own file lock: one writer or any number of readers.
  Every write is one short transaction, so a command that finds the index busy waits for it
  (:func:`wait_for_index`: it retries, says once that it is waiting, and gives up with one line
  after ``SCDRUGMAP_LOCK_TIMEOUT`` seconds, default 300). Long work (extraction, probing) never
  holds the index, so readers keep working while it runs.
* **A job** that fills a staging area over minutes or hours (extracting a backbone, importing
  embeddings under a backbone name, fine-tuning a run) holds an exclusive lock file
  ``DIR/.lock-<job>`` for its whole duration (:func:`job_lock`). A second command of the same
  job stops at once with one line naming it; different jobs run side by side. The file exists
  only while the job runs (a refused or finished job leaves the store as it was).
* **Work folders** (a store being created, a pack, an unpack, a merge) are hidden siblings of
  their destination, ``.<name>.<kind>-<id>``, each held by a lock on ``.<name>.<kind>-<id>.lock``
  (:func:`work_dir`). One whose lock is free belongs to a process that died; the next command
  that makes one for the same destination removes it, and ``store info`` reports those beside
  a store.

Locks are ``flock`` locks (POSIX systems, NFS included on Linux); where ``fcntl`` does not exist
(Windows) the job and work-folder locks are skipped and DuckDB's lock alone guards the index.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from ..errors import UserError

try:
    import fcntl
except ImportError:                          # pragma: no cover - Windows
    fcntl = None

JOB_PREFIX = ".lock-"
WAIT_MESSAGE_AFTER = 1.0                     # seconds of waiting before saying so
_PID_RE = re.compile(r"\(PID (\d+)\)")


def lock_timeout() -> float:
    text = os.environ.get("SCDRUGMAP_LOCK_TIMEOUT", "")
    try:
        return float(text) if text else 300.0
    except ValueError:
        raise UserError(f"SCDRUGMAP_LOCK_TIMEOUT={text!r} is not a number of seconds: fix or unset it") from None


def say(message: str) -> None:
    """A status line on stderr (the CLI's channel for progress; results go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def is_lock_conflict(err: BaseException) -> bool:
    """A DuckDB error that means another process (or connection) holds the index."""
    text = str(err)
    return "Could not set lock on file" in text or "Conflicting lock" in text or (
        "different configuration than existing connections" in text)


def wait_for_index(open_connection, where: str):
    """``open_connection()``, retried while another process holds the index; see the module docstring."""
    deadline = time.monotonic() + lock_timeout()
    start, delay, told = time.monotonic(), 0.02, False
    while True:
        try:
            return open_connection()
        except Exception as e:              # duckdb.Error: not imported here, to stay light
            if not is_lock_conflict(e):
                raise
            holder = _PID_RE.search(str(e))
            who = f"process {holder.group(1)}" if holder else "another connection"
            if time.monotonic() >= deadline:
                raise UserError(f"the index of {where} is held by {who} for more than {lock_timeout():.0f} s: "
                                "wait for that command to finish (or close the program holding the index), then "
                                "run this again; SCDRUGMAP_LOCK_TIMEOUT sets how long to wait") from None
            if not told and time.monotonic() - start >= WAIT_MESSAGE_AFTER:
                say(f"waiting for {who} to finish with the index of {where} ...")
                told = True
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)


class LockFile:
    """An exclusive ``flock`` on ``path``, created for the purpose and removed on release.

    Removing a lock file is safe because a holder checks, after locking, that the path still
    names the file it locked (else it locks the new one): two holders never coexist.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = None

    def acquire(self, blocking: bool = False) -> bool:
        if fcntl is None:                    # pragma: no cover
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)                     # removed (or replaced) between open and lock: again

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _holds(path: Path) -> bool:
    """Whether some live process holds the lock file ``path`` (False if it is absent)."""
    if fcntl is None or not path.exists():   # pragma: no cover
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def job_lock(store_dir: Path, job: str, describe: str):
    """Hold the store's lock of ``job`` (e.g. 'extract-pca') for the block; a one-line error naming
    ``describe`` (e.g. "'scdrugmap extract --backbone pca'") when another process holds it."""
    lock = LockFile(Path(store_dir) / f"{JOB_PREFIX}{job}")
    try:
        got = lock.acquire()
    except OSError as e:
        from .common import DiskError, disk_errno

        code = disk_errno(e)
        if code is None:
            raise
        raise DiskError(code, store_dir, f"taking the lock of {describe}") from None
    if not got:
        raise UserError(f"another {describe} is running on the store {store_dir}: wait for it to finish, then run "
                        "this again (what it finished is kept and skipped)")
    try:
        yield
    finally:
        lock.release()


def running_jobs(store_dir: Path) -> list[str]:
    """The jobs whose lock a live process holds."""
    return sorted(p.name[len(JOB_PREFIX):] for p in Path(store_dir).glob(f"{JOB_PREFIX}*") if _holds(p))


def _work_pattern(name: str, kind: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.{re.escape(kind)}-[0-9a-f]+$")


def stale_work_dirs(parent: Path, name: str, kinds=("creating", "packing", "unpacking", "merging")) -> list[Path]:
    """Work folders beside ``parent/name`` left by processes that died (their lock is free)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = []
    patterns = [_work_pattern(name, k) for k in kinds]
    for p in parent.iterdir():
        if any(pat.match(p.name) for pat in patterns) and not _holds(p.with_name(p.name + ".lock")):
            found.append(p)
    return sorted(found)


def remove_stale_work_dirs(parent: Path, name: str, kind: str) -> None:
    """Remove the work folders of ``kind`` for ``parent/name`` whose process died."""
    for stale in stale_work_dirs(parent, name, (kind,)):
        lock = LockFile(stale.with_name(stale.name + ".lock"))
        if lock.acquire():                  # no one else is cleaning it up at this moment
            try:
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            finally:
                lock.release()


@contextlib.contextmanager
def work_dir(final: Path, kind: str):
    """A new hidden sibling folder of ``final`` for building it (same file system, so a rename
    moves it into place), locked while this process uses it and removed at the end unless it
    was moved. Stale folders of the same kind for ``final`` are removed first."""
    final = Path(final)
    parent = final.parent
    remove_stale_work_dirs(parent, final.name, kind)
    while True:
        path = parent / f".{final.name}.{kind}-{uuid.uuid4().hex[:8]}"
        lock = LockFile(path.with_name(path.name + ".lock"))
        if lock.acquire() and not path.exists():
            break
        lock.release()
    try:
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lock.release()
