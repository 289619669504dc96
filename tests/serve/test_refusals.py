"""Every refusal of the web app over HTTP (a real server on 127.0.0.1): writes without
--allow-writes, oversized and malformed uploads, SQL that writes or reads files, path-like
names, posts from other sites, other Host headers; each leaves the store exactly as it was."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="scdrugmap[serve] is not installed")
pytest.importorskip("uvicorn", reason="scdrugmap[serve] is not installed")

from conftest import snapshot  # noqa: E402
from scdrugmap.cli import main  # noqa: E402
from webapp import chunked_upload, declared_upload, form, http, multipart, running  # noqa: E402

UPLOAD_FIELDS = {"dataset": "new", "label_col": "response", "sample_col": "sample_id"}


@pytest.fixture
def st(store_copy):
    return store_copy()


def test_read_only_server_refuses_every_write(st, pc9):
    before = snapshot(st)
    with running(st) as base:
        page = http(f"{base}/upload")
        assert page.status == 200 and "read-only" in page.text and 'id="upload"' not in page.text
        body, headers = multipart(UPLOAD_FIELDS, "file", "pc9.h5ad", pc9.read_bytes()[:5000])
        for path, (data, hdrs) in {"/upload": (body, headers),
                                   "/train": form({"backbone": "pca", "head": "lr", "protocol": "pooled"}),
                                   "/predict": form({"dataset": "SimData1", "model": "x"})}.items():
            r = http(f"{base}{path}", data=data, headers=hdrs)
            assert r.status == 403, (path, r.status)
            assert "read-only" in r.text and "--allow-writes" in r.text
    assert snapshot(st) == before
    assert not (st.parent / f"{st.name}.uploads").exists() or not any((st.parent / f"{st.name}.uploads").iterdir())


def test_oversized_and_malformed_uploads_leave_the_store_as_it_was(st, tmp_path, pc9):
    before = snapshot(st)
    uploads = tmp_path / "up"
    with running(st, allow_writes=True, max_upload_mb=1, upload_dir=uploads) as base:
        # larger than the limit (PC9 is 5 MB; the limit 1 MB): refused from its Content-Length
        body, headers = multipart(UPLOAD_FIELDS, "file", "pc9.h5ad", pc9.read_bytes())
        r = declared_upload(base, "/upload", body, headers, len(body))
        assert r.status == 413 and "limit of 1 MB" in r.text
        # a body longer than its declared size is cut by the server; one without a size is refused
        small, small_headers = multipart(UPLOAD_FIELDS, "file", "x.h5ad", b"x" * 100)
        assert chunked_upload(base, "/upload", small, small_headers).status == 411
        # not an HDF5 file, though named .h5ad
        body, headers = multipart(UPLOAD_FIELDS, "file", "x.h5ad", b"not an h5ad file\n" * 100)
        r = http(f"{base}/upload", data=body, headers=headers)
        assert r.status == 400 and 'id="error"' in r.text and "Traceback" not in r.text
        # a table whose gene columns are not numbers, and one without the condition column
        table = b"barcode,condition,GAPDH\nc1,ctrl,x\nc2,drug,y\n"
        body, headers = multipart({"dataset": "t", "label_col": "condition"}, "file", "t.csv", table)
        r = http(f"{base}/upload", data=body, headers=headers)
        assert r.status == 400 and "not numbers" in r.text
        body, headers = multipart({"dataset": "t", "label_col": "response"}, "file", "t.csv",
                                  b"barcode,condition,GAPDH\nc1,ctrl,1\n")
        assert "no column 'response'" in http(f"{base}/upload", data=body, headers=headers).text
        # another format, a bad dataset name, labels that are not mapped
        body, headers = multipart(UPLOAD_FIELDS, "file", "pc9.zip", b"PK\x03\x04")
        assert "not .h5ad, .csv or .tsv" in http(f"{base}/upload", data=body, headers=headers).text
    with running(st, allow_writes=True, upload_dir=uploads) as base:
        body, headers = multipart({**UPLOAD_FIELDS, "dataset": "../../etc/x"}, "file", "pc9.h5ad", pc9.read_bytes())
        r = http(f"{base}/upload", data=body, headers=headers)
        assert r.status == 400 and "dataset name '../../etc/x' is invalid" in r.text
        body, headers = multipart({**UPLOAD_FIELDS, "label_col": "condition"}, "file", "pc9.h5ad", pc9.read_bytes())
        r = http(f"{base}/upload", data=body, headers=headers)
        assert r.status == 400 and "not mapped to sensitive/resistant" in r.text
        # the form keeps what was typed
        assert 'value="new"' in r.text
    assert snapshot(st) == before
    assert list(uploads.iterdir()) == []


@pytest.mark.parametrize("query, match", [
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM glob('/*')", "disabled"),
    ("COPY cells TO '/tmp/scdrugmap-serve-test.csv'", "only SELECT is allowed"),
    ("DELETE FROM cells", "only SELECT is allowed"),
    ("ATTACH '/tmp/other.duckdb' AS o", "only SELECT is allowed"),
    ("SELECT 1; DROP TABLE cells", "2 statements"),
    ("INSTALL httpfs", "only SELECT is allowed"),
])
def test_the_sql_box_cannot_write_or_read_files(small_store, query, match):
    import urllib.parse

    before = snapshot(small_store)
    with running(small_store) as base:
        for path in ("/sql", "/sql.csv"):
            r = http(f"{base}{path}?q={urllib.parse.quote(query)}")
            assert r.status == 400 and match in r.text, (path, r.status, r.text[-500:])
            assert "root:" not in r.text
    assert snapshot(small_store) == before


def test_values_are_escaped_in_pages(small_store):
    import urllib.parse

    with running(small_store) as base:
        query = urllib.parse.quote("SELECT '<script>alert(1)</script>' AS x")
        r = http(f"{base}/sql?q={query}")
        assert r.status == 200 and b"&lt;script&gt;alert(1)&lt;/script&gt;" in r.body and b"<script>alert" not in r.body


def test_path_like_names_other_sites_and_other_hosts_are_refused(st, pc9):
    before = snapshot(st)
    with running(st, allow_writes=True) as base:
        for path in ("/datasets/..%2F..%2Fetc%2Fpasswd", "/datasets/%2Fetc%2Fpasswd", "/runs/..%2Findex.duckdb",
                     "/predictions.csv?model=..%2F..%2Fx&dataset=SimData1",
                     "/predictions.csv?model=pca-lr&dataset=%2Fetc%2Fpasswd", "/jobs/..%2F..%2Fetc",
                     "/static/..%2F..%2Fapp.py", "/static/../app.py"):
            r = http(f"{base}{path}")
            assert r.status in (400, 404), (path, r.status)
            assert "root:" not in r.text and "create_app" not in r.text
        assert http(f"{base}/datasets/%2E%2E").status == 400 and http(f"{base}/runs/%2E%2E").status == 400
        assert http(f"{base}/datasets/nope").status == 404
        # a form posted by another site's page (its Origin) is refused, even with --allow-writes
        data, headers = form({"backbone": "pca", "head": "lr", "protocol": "pooled"})
        r = http(f"{base}/train", data=data, headers={**headers, "Origin": "http://evil.example"})
        assert r.status == 403 and "evil.example" in r.text
        # a Host other than 127.0.0.1/localhost (DNS rebinding) is refused
        assert http(f"{base}/", headers={"Host": "evil.example"}).status == 400
        # a cohort condition that is not one condition
        data, headers = form({"backbone": "pca", "head": "lr", "protocol": "pooled",
                              "where": "TRUE) UNION SELECT * FROM read_csv('/etc/passwd') --"})
        assert http(f"{base}/train", data=data, headers=headers).status == 400
        assert http(f"{base}/train", data=form({"backbone": "../x", "head": "lr"})[0],
                    headers=form({})[1]).status == 400
    assert snapshot(st) == before


def test_serve_needs_its_extra_and_warns_off_loopback(st, monkeypatch):
    import sys

    from click.testing import CliRunner

    runner = CliRunner()
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    r = runner.invoke(main, ["serve", "--store", str(st)])
    assert r.exit_code == 2 and r.stderr.strip() == ("Error: scdrugmap serve needs uvicorn, which are not installed: "
                                                     "pip install 'scdrugmap[serve]'")
    monkeypatch.undo()
    import uvicorn

    calls = []

    def run(server, sockets):                 # the socket the server would answer on, not served
        calls.append({"host": sockets[0].getsockname()[0], "port": sockets[0].getsockname()[1]})
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    r = runner.invoke(main, ["serve", "--store", str(st), "--port", "0"])
    assert r.exit_code == 0 and calls[-1]["host"] == "127.0.0.1" and "warning" not in r.stderr
    assert f"at http://127.0.0.1:{calls[-1]['port']} " in r.stderr and calls[-1]["port"] > 0   # the real port
    r = runner.invoke(main, ["serve", "--store", str(st), "--host", "0.0.0.0", "--allow-writes", "--port", "0"])
    assert r.exit_code == 0 and calls[-1]["host"] == "0.0.0.0"
    assert "warning: listening on 0.0.0.0: the app is reachable from other machines" in r.stderr
    r = runner.invoke(main, ["serve", "--store", str(st.parent / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    # a busy port, an unknown host and an upload folder that cannot be made: one line each, exit 2
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = runner.invoke(main, ["serve", "--store", str(st), "--port", str(busy.getsockname()[1])])
    assert r.exit_code == 2 and r.stderr.startswith("Error: cannot listen on 127.0.0.1 port") and \
        r.stderr.count("\n") == 1
    r = runner.invoke(main, ["serve", "--store", str(st), "--host", "no-such-host.invalid"])
    assert r.exit_code == 2 and r.stderr.startswith("Error: --host no-such-host.invalid")
    r = runner.invoke(main, ["serve", "--store", str(st), "--allow-writes", "--upload-dir", "/proc/uploads"])
    assert r.exit_code == 2 and "--upload-dir" in r.stderr
    r = runner.invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "--allow-writes" in r.output
