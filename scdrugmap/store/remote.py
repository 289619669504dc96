"""Stores opened by URL (``s3://bucket/prefix``, ``https://host/path``, any fsspec URL): read-only.

* **Index**: ``index.duckdb`` is downloaded once, through fsspec, into a local cache
  (``$SCDRUGMAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/scdrugmap`` or ``~/.cache/scdrugmap``,
  one folder per URL) and queried there with DuckDB. It is downloaded again only when the
  remote file changes: the cached copy is reused while the remote size and its ETag or
  modification time are those recorded at download. (DuckDB's httpfs extension could read
  the index in place, but it is an extension download that is impossible offline and it
  cannot attach every remote file read-only reliably; a local copy works everywhere and
  makes every later query local.)
* **Embeddings**: the Zarr arrays are opened through ``zarr.storage.FsspecStore``; reading
  the selected rows fetches only the chunk objects that hold them.
* **Bytes read**: every object read is counted (``store.io``, ``store.bytes_read``, and
  ``--verbose`` on the command line): the index download plus the chunks.
* **Read-only**: anything that would write (ingest, extract, import-embeddings, zero-shot)
  is refused with a clear error; ``probe`` runs and prints its results, which are not stored.

Credentials and endpoints come from fsspec's usual places: ``storage_options`` in the API;
for the CLI the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL_S3`` for an S3-compatible server, or fsspec's ``FSSPEC_S3_<OPTION>`` variables).
Needs ``pip install 'scdrugmap[remote]'`` (fsspec, s3fs, aiohttp).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..errors import UserError
from . import arrays
from .common import EMBEDDINGS, INDEX
from .common import first_line as _first_line
from .store import URL_OPENERS, Store

# fields of fsspec's ``info()`` that change when a file is rewritten (besides its size)
_VALIDATORS = ("ETag", "etag", "LastModified", "Last-Modified", "last_modified", "mtime", "md5Hash", "generation")


def cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SCDRUGMAP_CACHE_DIR"):
        return Path(os.environ["SCDRUGMAP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scdrugmap"


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise UserError("opening a store by URL needs fsspec (and s3fs for s3://, aiohttp for http(s)://): "
                        "pip install 'scdrugmap[remote]'") from None
    return fsspec


def _io_error(e: BaseException) -> bool:
    """An error of the transport (network, permissions, credentials), not a bug."""
    if isinstance(e, (OSError, TimeoutError, PermissionError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ClientError", "BotoCoreError", "NoCredentialsError", "ClientResponseError",
                         "ClientConnectorError", "HttpResponseError", "FSTimeoutError"})


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {_first_line(e)}"


class RemoteStore(Store):
    """A store read through fsspec; see the module docstring."""

    remote = True
    read_only = True
    read_only_reason = "opened by URL"

    def __init__(self, url: str, storage_options: dict | None = None, cache_dir=None):
        self.url = url.rstrip("/")
        self.path = self.url
        self.storage_options = dict(storage_options or {})
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.cache_dir = cache_root(cache_dir) / "remote" / key
        self.index_path = self.cache_dir / INDEX
        self.embeddings_path = None          # no local arrays: see open_array
        self.embeddings_url = f"{self.url}/{EMBEDDINGS}"
        self.io = arrays.IOStats()
        self.migrated = []
        self.index_size = 0
        self._zarr_inner = None
        self._fs = None

    @property
    def location(self) -> str:
        return self.url

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open_url(cls, url: str, storage_options: dict | None = None, cache_dir=None) -> "RemoteStore":
        store = cls(url, storage_options, cache_dir)
        store._fetch_index()
        store._check_schema()        # a newer schema is refused; an older one migrated in the local copy
        return store

    def _filesystem(self):
        if self._fs is None:
            fsspec = _fsspec()
            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            except ImportError as e:
                raise UserError(f"cannot open {self.url}: {_first_line(e)} (pip install 'scdrugmap[remote]')") \
                    from None
            except ValueError as e:
                raise UserError(f"cannot open {self.url}: {_first_line(e)}") from None
        return self._fs

    def _remote(self, rel: str) -> str:
        self._filesystem()
        return f"{self._root.rstrip('/')}/{rel}"

    def _fetch_index(self) -> None:
        fs = self._filesystem()
        remote = self._remote(INDEX)
        try:
            info = fs.info(remote)
        except Exception as e:
            # fsspec's HTTP file system reports a refused connection as FileNotFoundError too: its
            # cause tells (an HTTP status means the server answered)
            cause = e.__cause__ if isinstance(e, FileNotFoundError) else e
            if isinstance(e, FileNotFoundError) and (cause is None or getattr(cause, "status", None) is not None):
                raise UserError(f"no scdrugmap store at {self.url} (no {INDEX} there): check the URL") from None
            if not _io_error(cause):
                raise
            raise UserError(f"cannot reach {self.url} ({_describe(cause)}): check the URL, the network and the "
                            "credentials") from None
        size = int(info.get("size") or 0)
        validator = {"url": self.url, "size": size,
                     **{k: str(info[k]) for k in _VALIDATORS if info.get(k) not in (None, "")}}
        record = self.cache_dir / "source.json"
        strong = len(validator) > 2                # a size alone does not reveal a rewrite
        if strong and self.index_path.is_file() and record.is_file():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(record.read_text()) == validator:
                    self.io.index_cached = True
                    self.index_size = self.index_path.stat().st_size
                    return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".index-", suffix=".part")
        os.close(fd)
        try:
            fs.get_file(remote, tmp)
            os.replace(tmp, self.index_path)
        except Exception as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not _io_error(e):
                raise
            raise UserError(f"cannot download the index of {self.url} ({_describe(e)})") from None
        record.write_text(json.dumps(validator, sort_keys=True))
        self.index_size = self.index_path.stat().st_size
        self.io.index_bytes += self.index_size

    # ---- writes are refused --------------------------------------------------------------
    def require_writable(self, action: str) -> None:
        raise UserError(f"{self.url} is a remote store and read-only: {action} needs a local store "
                        "(unpack a pack of it, or copy the directory, then point --store at the copy)")

    @contextlib.contextmanager
    def transaction(self):
        self.require_writable("writing to the index")
        yield  # pragma: no cover

    # ---- embeddings ----------------------------------------------------------------------
    def open_array(self, rel: str):
        if self._zarr_inner is None:
            from zarr.storage import FsspecStore

            self._zarr_inner = FsspecStore.from_url(self.embeddings_url, storage_options=self.storage_options or None,
                                                    read_only=True)
        try:
            return arrays.open_counted(self._zarr_inner, self.io, rel)
        except FileNotFoundError:
            raise UserError(f"embedding array {rel} is missing at {self.embeddings_url}: the remote store is "
                            "incomplete (was it uploaded whole?)") from None

    def load_rows(self, backbone: str, cells, dtype=None):
        try:
            return super().load_rows(backbone, cells, dtype=dtype)
        except UserError:
            raise
        except Exception as e:
            if not _io_error(e):
                raise
            raise UserError(f"reading embeddings from {self.url} failed ({_describe(e)}): check the network "
                            "and the credentials") from None

    def array_nbytes(self, rel: str) -> int | None:
        """Bytes of one array at the remote end, when the file system can list it (HTTP cannot)."""
        try:
            return int(self._filesystem().du(self._remote(f"{EMBEDDINGS}/{rel}")))
        except Exception:
            return None


URL_OPENERS.append(RemoteStore.open_url)
