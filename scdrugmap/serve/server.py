"""Starting the app under uvicorn (the command line's and the tests' one way to run it)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def settings_for(store_path, host: str, allow_writes: bool, max_upload_mb: int, upload_dir=None):
    from ..store.store import Store
    from .app import Settings

    store = Store.open(store_path)                  # a clear error now rather than on the first page
    if allow_writes and store.read_only:
        raise UserError(f"--allow-writes: the store {store.location} is read-only ({store.read_only_reason}): "
                        "serve a copy you can write, or leave out --allow-writes")
    hosts = ("127.0.0.1", "localhost", "[::1]", "::1") if host in LOOPBACK else ("*",)
    return Settings(store_path=Path(store_path), allow_writes=allow_writes, max_upload_bytes=max_upload_mb * 10**6,
                    upload_dir=Path(upload_dir) if upload_dir else None, hosts=hosts)


def run_server(store_path, host: str, port: int, allow_writes: bool, max_upload_mb: int, upload_dir=None,
               echo=print) -> None:
    import uvicorn

    from .app import create_app

    settings = settings_for(store_path, host, allow_writes, max_upload_mb, upload_dir)
    if host not in LOOPBACK:
        echo(f"warning: listening on {host}: the app is reachable from other machines and has no login"
             + ("; anyone who reaches it can upload and train (--allow-writes)" if allow_writes else ""), err=True)
    mode = "read-write (--allow-writes)" if allow_writes else "read-only"
    echo(f"scdrugmap serve: {settings.store_path} ({mode}) at http://{host}:{port} (Ctrl+C stops)", err=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
