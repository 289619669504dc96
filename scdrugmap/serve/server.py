"""Starting the app under uvicorn (the command line's and the tests' one way to run it)."""

from __future__ import annotations

import socket
from pathlib import Path

from ..errors import UserError
from ..store.common import check_writable_dir

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def settings_for(store_path, host: str, allow_writes: bool, max_upload_mb: int, upload_dir=None):
    from ..store.store import Store
    from .app import Settings

    store = Store.open(store_path)                  # a clear error now rather than on the first page
    if allow_writes and store.read_only:
        raise UserError(f"--allow-writes: the store {store.location} is read-only ({store.read_only_reason}): "
                        "serve a copy you can write, or leave out --allow-writes")
    hosts = ("127.0.0.1", "localhost", "[::1]", "::1") if host in LOOPBACK else ("*",)
    settings = Settings(store_path=Path(store_path), allow_writes=allow_writes, max_upload_bytes=max_upload_mb * 10**6,
                        upload_dir=Path(upload_dir) if upload_dir else None, hosts=hosts)
    if allow_writes:                                # uploads go there: a bad folder is an error now, not a 500 later
        try:
            settings.uploads.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the upload folder {settings.uploads} ({e.strerror or e}): choose "
                            "another with --upload-dir") from None
        check_writable_dir(settings.uploads, "uploads")
    return settings


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a busy port or an unknown host is a one-line error, and
    --port 0 gets its real port to print."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror or e}: give an address of this machine, e.g. 127.0.0.1") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host} port {port} ({e.strerror or e}): choose another --port "
                        "(0: any free one) or --host") from None
    sock.listen(128)
    return sock


def run_server(store_path, host: str, port: int, allow_writes: bool, max_upload_mb: int, upload_dir=None) -> None:
    import click
    import uvicorn

    from .app import create_app

    settings = settings_for(store_path, host, allow_writes, max_upload_mb, upload_dir)
    sock = _listen(host, port)
    if host not in LOOPBACK:
        click.echo(f"warning: listening on {host}: the app is reachable from other machines and has no login"
                   + ("; anyone who reaches it can upload and train (--allow-writes)" if allow_writes else ""),
                   err=True)
    mode = "read-write (--allow-writes)" if allow_writes else "read-only"
    address, real_port = sock.getsockname()[:2]
    shown = f"[{address}]" if ":" in address else address
    click.echo(f"scdrugmap serve: {settings.store_path} ({mode}) at http://{shown}:{real_port} (Ctrl+C stops)",
               err=True)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    server.run(sockets=[sock])
