"""Stores opened by URL: over plain HTTP (a local http.server) and S3 (moto's server mode), both on
127.0.0.1. Read-only; only the chunks of the selected rows are read, and the bytes are counted."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import shutil
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

from conftest import snapshot

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

from scdrugmap.errors import UserError  # noqa: E402
from scdrugmap.probe.run import run_probe  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

TENTH = "dataset = 'SimData3'"          # 80 of 800 cells: 2 of the 20 pca chunks


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        while chunk := source.read(1 << 16):
            outputfile.write(chunk)
            self.server.bytes_sent += len(chunk)


@pytest.fixture(scope="module")
def http_store(small_store, tmp_path_factory):
    """(url, local copy being served, server) for a copy of the small store served over HTTP."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(small_store, root / "st")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(CountingHandler, directory=str(root)))
    server.bytes_sent = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/st", root / "st", server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_store(small_store):
    """(url, storage_options, env) for a copy of the small store in a bucket of a local moto server."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    import s3fs

    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="lab-bucket")
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.put(f"{small_store}/", "lab-bucket/shared/st/", recursive=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint}
    yield "s3://lab-bucket/shared/st", options, env
    server.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("SCDRUGMAP_CACHE_DIR", str(path))
    return path


def array_bytes(store_path, backbone="pca", where=None) -> int:
    """Bytes on disk of the arrays (chunks and metadata) of the selected datasets."""
    s = Store.open(store_path)
    prov = s.provenance(backbone)
    if where:
        prov = prov[prov["dataset"].isin(set(s.cells(where)["dataset"]))]
    return sum(s.array_nbytes(rel) for rel in prov["array_path"])


def test_http_store_reads_only_the_chunks_of_the_selected_rows(http_store, small_store, cache):
    url, served, server = http_store
    sent0 = server.bytes_sent
    s = Store.open(url)
    assert s.read_only and s.io.index_bytes == (served / "index.duckdb").stat().st_size
    pd.testing.assert_frame_equal(s.sql("SELECT * FROM cohort ORDER BY dataset, row"),
                                  Store.open(small_store).sql("SELECT * FROM cohort ORDER BY dataset, row"))
    X, cells = s.load("pca", where=TENTH)
    X_local, cells_local = Store.open(small_store).load("pca", where=TENTH)
    np.testing.assert_array_equal(X, X_local)
    pd.testing.assert_frame_equal(cells, cells_local)
    tenth = s.io.chunk_bytes
    assert tenth == array_bytes(small_store, where=TENTH)          # exactly that dataset's array, nothing else
    assert server.bytes_sent - sent0 == s.bytes_read               # what the server sent is what was counted
    s.load("pca")
    whole = s.io.chunk_bytes - tenth
    assert whole == array_bytes(small_store)
    assert 0.08 < tenth / whole < 0.12
    # the figures: a 10% selection against the whole store
    store_bytes = sum(p.stat().st_size for p in served.rglob("*") if p.is_file())
    print(f"\nHTTP: 10% selection read {tenth:,} B of embeddings ({tenth / whole:.1%} of {whole:,} B); "
          f"index {s.io.index_bytes:,} B; whole store {store_bytes:,} B")


def test_index_is_cached_and_downloaded_again_when_it_changes(http_store, store_copy, cache):
    url, served, _ = http_store
    first = Store.open(url)
    assert first.io.index_bytes > 0 and not first.io.index_cached
    again = Store.open(url)
    assert again.io.index_cached and again.bytes_read == 0
    assert "cached copy, nothing transferred" in again.io_summary()
    # the colleague adds a run to the served store
    before = again.sql("SELECT count(*) n FROM probe_runs")["n"][0]
    run_probe(Store.open(served), "pca", head="lr", protocol="cross", show_progress=False)
    later = time.time() + 5
    os.utime(served / "index.duckdb", (later, later))
    fresh = Store.open(url)
    assert not fresh.io.index_cached and fresh.sql("SELECT count(*) n FROM probe_runs")["n"][0] == before + 1


def test_s3_store_through_the_cli(cli, s3_store, small_store, store_copy, cache):
    url, options, env = s3_store
    s = Store.open(url, storage_options=options)
    X, _ = s.load("pca", where=TENTH)
    np.testing.assert_array_equal(X, Store.open(small_store).load("pca", where=TENTH)[0])
    assert s.io.chunk_bytes == array_bytes(small_store, where=TENTH)
    print(f"\nS3: 10% selection read {s.io.chunk_bytes:,} B of embeddings, index {s.io.index_bytes:,} B")

    result = cli.ok("query", "--store", url, "SELECT dataset, n_cells FROM datasets ORDER BY 1", "--verbose",
                    env=env)
    assert "SimData1" in result.output and f"bytes read from {url}:" in result.stderr
    result = cli.ok("probe", "--store", url, "--backbone", "pca", "--where", TENTH, "--group-by", "none",
                    "--quiet", "--verbose", env=env)
    assert "pooled" in result.output and "not stored" in result.stderr
    read = array_bytes(small_store, where=TENTH)
    assert f"embeddings {read:,} B in 3 objects" in result.stderr      # zarr.json + 2 chunks
    # the same probe on a local copy scores the same
    remote = run_probe(Store.open(url, storage_options=options), "pca", where=TENTH, group_by="none",
                       show_progress=False)
    local = run_probe(Store.open(store_copy()), "pca", where=TENTH, group_by="none", show_progress=False)
    assert not remote.stored and local.stored
    pd.testing.assert_frame_equal(remote.results.drop(columns="fit_seconds"),
                                  local.results.drop(columns="fit_seconds"))
    out = cli.ok("export", "--store", url, "--backbone", "pca", "--where", TENTH, "--to",
                 cache.parent / "tenth.parquet", env=env).output
    assert "80 cells x 50" in out


@pytest.mark.parametrize("args, match", [
    (["ingest", "{data}/SimData1.h5ad", "--store", "{url}", "--dataset", "x", "--label-col", "response"], "read-only"),
    (["extract", "--store", "{url}", "--backbone", "hvg"], "read-only"),
    (["import-embeddings", "--store", "{url}", "--dataset", "SimData1", "--backbone", "x", "--from", "{tmp}/x.npy"],
     "read-only"),
    (["zero-shot", "--store", "{url}", "--dataset", "SimData1", "--yes"], "read-only"),
    (["store", "pack", "{url}", "{tmp}/x.tar"], "URL"),
    (["store", "merge", "{url}", "{url}", "--into", "{tmp}/c"], "URL"),
])
def test_remote_store_is_read_only(cli, http_store, small_store, cache, tmp_path, args, match):
    url, served, _ = http_store
    np.save(tmp_path / "x.npy", np.zeros((80, 4), dtype=np.float32))
    before = snapshot(served)
    argv = [a.format(url=url, data=small_store.parent / "data", tmp=tmp_path) for a in args]
    cli.fails(*argv, match=match)
    assert snapshot(served) == before
    with pytest.raises(UserError, match="read-only"):
        with Store.open(url).transaction():
            pass


def test_bad_urls(cli, http_store, cache):
    url, _, _ = http_store
    cli.fails("query", "--store", url + "-nothing", "SELECT 1", match="no scdrugmap store at")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cli.fails("query", "--store", f"http://127.0.0.1:{port}/st", "SELECT 1", match="cannot reach")


def test_store_info_over_http(cli, http_store, cache):
    url, _, _ = http_store
    result = cli.ok("store", "info", url, "--verbose")
    assert f"store {url}, read-only" in result.output and "10 datasets, 800 cells" in result.output
    assert f"bytes read from {url}:" in result.stderr and "downloaded" in result.stderr


def test_file_url_is_a_local_path(small_store):
    s = Store.open(f"file://{small_store}")
    assert not s.read_only and s.path == small_store
