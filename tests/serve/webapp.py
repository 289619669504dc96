"""A real server (uvicorn in a thread, on a free port of 127.0.0.1) over a store, and plain HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(store_path, allow_writes=False, max_upload_mb=2000, upload_dir=None):
    """The app of ``scdrugmap serve`` over ``store_path``; yields its base URL."""
    import uvicorn

    from scdrugmap.serve.app import create_app
    from scdrugmap.serve.server import settings_for

    settings = settings_for(store_path, "127.0.0.1", allow_writes, max_upload_mb, upload_dir)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Reply:
    def __init__(self, status, body: bytes, headers):
        self.status, self.body, self.headers = status, body, headers

    @property
    def text(self) -> str:
        import html

        return html.unescape(self.body.decode("utf-8", "replace"))


def http(url, data: bytes | None = None, headers=None, method=None) -> Reply:
    """One request; HTTP errors are returned, not raised (redirects are not followed)."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(req, timeout=60) as r:
            return Reply(r.status, r.read(), r.headers)
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read(), e.headers)


def multipart(fields: dict, file_field: str | None = None, filename: str | None = None,
              content: bytes = b"") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    if file_field:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def form(fields: dict) -> tuple[bytes, dict]:
    return urllib.parse.urlencode(fields).encode(), {"Content-Type": "application/x-www-form-urlencoded"}


def wait_job(base: str, job_path: str, limit: float = 120) -> dict:
    import json

    deadline = time.monotonic() + limit
    while True:
        status = json.loads(http(f"{base}{job_path}.json").text)
        if status["state"] in ("done", "failed"):
            return status
        assert time.monotonic() < deadline, f"the job did not finish: {status}"
        time.sleep(0.1)


def declared_upload(base: str, path: str, body: bytes, headers: dict, declared: int) -> Reply:
    """A request that says its body is ``declared`` bytes long and sends only the start of it:
    a refusal from the declared size must come without reading the body."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=60)
    con.putrequest("POST", path)
    for k, v in {**headers, "Content-Length": str(declared)}.items():
        con.putheader(k, v)
    con.endheaders()
    con.send(body[:1000])
    r = con.getresponse()
    reply = Reply(r.status, r.read(), r.headers)
    con.close()
    return reply


def chunked_upload(base: str, path: str, body: bytes, headers: dict) -> Reply:
    """A request without a Content-Length (chunked transfer encoding)."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=60)
    con.request("POST", path, body=iter([body]), headers=headers, encode_chunked=True)
    r = con.getresponse()
    reply = Reply(r.status, r.read(), r.headers)
    con.close()
    return reply
