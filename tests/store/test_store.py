"""Store: read-only SQL, row-aligned loading, AnnData export, crash-safe resumable writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import snapshot, slow_env, wait_for
from scdrugmap.errors import UserError
from scdrugmap.store import arrays
from scdrugmap.store.store import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory, request):
    from conftest import GBM, PC9, need_shared, Cli

    need_shared(PC9), need_shared(GBM)
    path = tmp_path_factory.mktemp("store") / "st"
    cli = Cli()
    cli.ok("ingest", PC9, "--store", path, "--dataset", "pc9", "--label-col", "response",
           "--sample-col", "sample_id", "--cancer-type", "Lung cancer")
    cli.ok("ingest", GBM, "--store", path, "--dataset", "gbm", "--label-col", "response",
           "--sensitive", "untreated", "--resistant", "panobinostat", "--patient-col", "patient_id",
           "--sample-col", "sample_id", "--cancer-type", "Glioblastoma")
    cli.ok("extract", "--store", path, "--backbone", "hvg", "--backbone", "pca", "--chunk-rows", "512", "--quiet")
    return path


def test_query_prints_table_and_writes_files(cli, store, tmp_path):
    out = cli.ok("query", "--store", store, "SELECT dataset, count(*) AS n FROM cells GROUP BY 1 ORDER BY 1",
                 "--csv", tmp_path / "q.csv", "--parquet", tmp_path / "q.parquet").output
    assert "gbm" in out and "5000" in out and "1505" in out
    assert pd.read_csv(tmp_path / "q.csv").to_dict("list") == {"dataset": ["gbm", "pc9"], "n": [5000, 1505]}
    assert len(pd.read_parquet(tmp_path / "q.parquet")) == 2


@pytest.mark.parametrize("sql, match", [
    ("DELETE FROM cells", "DELETE statement"),
    ("INSERT INTO meta VALUES ('a', 'b')", "INSERT statement"),
    ("DROP TABLE cells", "DROP statement"),
    ("COPY cells TO 'x.csv'", "COPY statement"),
    ("SELECT 1; DELETE FROM cells", "2 statements"),
    ("SELEC * FROM cells", "syntax error"),
    ("SELECT nonexistent FROM cells", "SQL error"),
])
def test_query_refuses_writes_and_reports_errors(cli, store, sql, match):
    before = snapshot(store)
    cli.fails("query", "--store", store, sql, match=match)
    assert snapshot(store) == before


def test_load_is_row_aligned_with_cells(store):
    s = Store.open(store)
    X_all, cells_all = s.load("hvg")
    assert X_all.shape == (6505, 978) and X_all.dtype == np.float16
    X, cells = s.load("hvg", where="dataset = 'gbm' AND patient IN ('PW032', 'PW040') AND label = 'resistant'")
    assert len(cells) == 1000 and set(cells["patient"]) == {"PW032", "PW040"}
    # every selected row equals the same cell's row in the full load
    key = cells_all.set_index(["dataset", "row"]).index
    pos = key.get_indexer(pd.MultiIndex.from_frame(cells[["dataset", "row"]]))
    np.testing.assert_array_equal(X, X_all[pos])


def test_load_pca_recomputes_from_source(store):
    """The stored pca rows equal a recomputation from the source counts with the saved fit."""
    import anndata as ad
    from conftest import PC9
    from scdrugmap.extract.panel import load_panel, panel_columns, panel_features

    s = Store.open(store)
    X, cells = s.load("pca", where="dataset = 'pc9'", dtype=np.float32)
    fit_id = s.sql("SELECT json_extract_string(params, '$.fit_id') f FROM provenance WHERE backbone='pca'")["f"]
    assert fit_id.nunique() == 1
    fit = np.load(Path(store) / "models" / "pca" / f"{fit_id[0]}.npz")
    a = ad.read_h5ad(PC9)
    panel = load_panel()
    src, dst = panel_columns(panel, np.asarray(a.var_names))
    expected = (panel_features(a.X[:50], src, dst, len(panel), "counts") - fit["mean"]) @ fit["components"].T
    np.testing.assert_allclose(X[:50], expected, rtol=1e-2, atol=2e-2)


def test_to_anndata_has_embedding_and_obs(store):
    adata = Store.open(store).to_anndata("pca", where="label = 'sensitive'")
    assert adata.n_obs == 379 + 2500
    assert adata.obsm["X_pca"].shape == (2879, 50)
    assert set(adata.obs["label"]) == {"sensitive"}
    assert adata.uns["scdrugmap"]["backbone"] == "pca"


def test_load_errors(store):
    s = Store.open(store)
    with pytest.raises(UserError, match="matches no cells"):
        s.load("hvg", where="dataset = 'nothing'")
    with pytest.raises(UserError, match="has no embeddings"):
        s.load("geneformer")
    with pytest.raises(UserError, match="invalid --where"):
        s.load("hvg", where="no_such_column = 1")
    with pytest.raises(UserError, match="more than one statement"):   # no statement can be smuggled in
        s.cells(where="1=1; DELETE FROM cells")
    assert len(s.cells()) == 6505


def test_read_rows_touches_only_needed_chunks(tmp_path):
    import zarr

    arr = zarr.create_array(store=str(tmp_path / "a"), shape=(1000, 4), chunks=(100, 4), dtype="float32")
    data = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    arr[:] = data
    rows = np.array([3, 5, 250, 251, 999])
    np.testing.assert_array_equal(arrays.read_rows(arr, rows), data[rows])
    np.testing.assert_array_equal(arrays.read_rows(arr, np.arange(1000)), data)
    assert arrays.read_rows(arr, np.array([], dtype=int)).shape == (0, 4)
    out = np.zeros((2, 4), dtype=np.float64)                  # another dtype than stored
    arrays.read_rows(arr, np.array([10, 500]), out=out)
    np.testing.assert_array_equal(out, data[[10, 500]])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_direct_local_reader_equals_zarr(tmp_path, monkeypatch, dtype):
    """Arrays of the store's layout on a local disk are read without zarr; every selection gives
    zarr's values, into any output dtype, and its chunk reads are counted."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1030, 7)).astype(dtype)
    arr = arrays.create_array(tmp_path / "a", shape=data.shape, chunks=(100, 7), dtype=dtype)
    arr[:] = data
    stats = arrays.IOStats()
    from zarr.storage import LocalStore

    counted = arrays.open_counted(LocalStore(str(tmp_path)), stats, "a")
    assert arrays._local_layout(counted) is not None
    selections = [np.arange(1030), np.array([0]), np.array([1029]), np.arange(100, 200), np.arange(95, 305),
                  np.sort(rng.choice(1030, 400, replace=False)), np.array([5, 99, 100, 1000, 1029])]
    direct = [arrays.read_rows(counted, rows) for rows in selections]
    as_float32 = [arrays.read_rows(counted, rows, out=np.empty((len(rows), 7), np.float32)) for rows in selections]
    assert stats.chunk_bytes > 0
    monkeypatch.setattr(arrays, "_local_layout", lambda array: None)
    for rows, got, got32 in zip(selections, direct, as_float32):
        np.testing.assert_array_equal(got, data[rows])
        np.testing.assert_array_equal(got, arrays.read_rows(counted, rows))
        np.testing.assert_array_equal(got32, data[rows].astype(np.float32))


def test_arrays_of_another_layout_are_read_through_zarr(tmp_path):
    import zarr

    arr = zarr.create_array(store=str(tmp_path / "a"), shape=(300, 3), chunks=(100, 3), dtype="float32")
    assert arrays._local_layout(arr) is None                 # no checksums: zarr reads it
    arr[:] = np.ones((300, 3), np.float32)
    np.testing.assert_array_equal(arrays.read_rows(arr, np.array([1, 299])), np.ones((2, 3), np.float32))


def test_load_of_some_columns(store):
    s = Store.open(store)
    X, cells = s.load("pca", where="label = 'resistant'", columns=["label"])
    assert list(cells.columns) == ["dataset", "row", "label"]
    X_all, cells_all = s.load("pca", where="label = 'resistant'")
    np.testing.assert_array_equal(X, X_all)
    assert cells[["dataset", "row"]].equals(cells_all[["dataset", "row"]])
    with pytest.raises(UserError, match="unknown cohort column"):
        s.load("pca", columns=["nope"])


def test_killed_extraction_is_invisible_and_resumes(store, tmp_path):
    """SIGKILL a real `scdrugmap extract` after exactly 3 chunks; readers see nothing; a rerun resumes."""
    import shutil

    st = tmp_path / "st"
    shutil.copytree(store, st)
    cmd = [sys.executable, "-m", "scdrugmap.cli", "extract", "--store", str(st), "--backbone", "slow-hvg",
           "--dataset", "gbm", "--chunk-rows", "500", "--quiet"]
    proc = subprocess.Popen(cmd, env=slow_env(tmp_path, hold_after=3), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    staging = st / "embeddings.zarr" / arrays.STAGING
    wait_for(lambda: (tmp_path / "holding").exists(), proc, "the 4th chunk")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(staging.glob("*/done/*")))
    assert n_done == 3, n_done

    s = Store.open(st)
    assert "slow-hvg" not in s.extracted_backbones()
    with pytest.raises(UserError, match="has no embeddings"):
        s.load("slow-hvg")

    (tmp_path / "chunks.log").unlink()
    result = subprocess.run(cmd, env=slow_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resumed after {n_done} chunks" in result.stdout
    computed = (tmp_path / "chunks.log").read_text().split()
    assert len(computed) == 10 - n_done          # only the missing chunks were computed
    X_resumed, _ = Store.open(st).load("slow-hvg", where="dataset = 'gbm'")
    X_clean, _ = Store.open(st).load("hvg", where="dataset = 'gbm'")
    np.testing.assert_array_equal(X_resumed, X_clean)
    assert not list(staging.glob("*"))           # staging cleaned up after commit
