"""export (.h5ad, .parquet) and import-embeddings (.npy, .h5ad, .parquet): round trips, alignment by
cell name, provenance marked external, and every bad input refused with the store unchanged."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import snapshot
from scdrugmap.store.store import Store

DS = "SimData3"


def load(store, backbone, dataset=DS, dtype=None):
    return Store.open(store).load(backbone, where=f"dataset = '{dataset}'", dtype=dtype)


@pytest.mark.parametrize("fmt", ["h5ad", "parquet"])
def test_export_then_import_gives_identical_embeddings(cli, store_copy, tmp_path, fmt):
    st = store_copy()
    out = tmp_path / f"pca.{fmt}"
    msg = cli.ok("export", "--store", st, "--backbone", "pca", "--to", out).output
    assert "800 cells x 50 (float16)" in msg
    # the file holds every dataset: each import takes its own dataset's rows, by cell name
    for dataset in ("SimData1", DS):
        msg = cli.ok("import-embeddings", "--store", st, "--dataset", dataset, "--backbone", "pca-copy",
                     "--from", out, "--key", "X_pca").output
        assert "aligned by cell names" in msg and "origin: external" in msg
    two = "dataset IN ('SimData1', 'SimData3')"
    X0, c0 = Store.open(st).load("pca", where=two)
    X1, c1 = Store.open(st).load("pca-copy", where=two)
    assert X1.dtype == np.float16
    np.testing.assert_array_equal(X0, X1)
    pd.testing.assert_frame_equal(c0, c1)
    prov = Store.open(st).provenance("pca-copy").iloc[0]
    params = json.loads(prov["params"])
    assert prov["origin"] == "external" and prov["checkpoint_sha256"] is None
    assert params["format"] == fmt and params["file"] == out.name and len(params["file_sha256"]) == 64
    assert params["aligned_by"] == "cell names" and params["key"] == "X_pca"


def test_exported_h5ad_and_parquet_hold_cells_and_provenance(cli, small_store, tmp_path):
    cli.ok("export", "--store", small_store, "--backbone", "pca", "--where", "label = 'resistant'",
           "--to", tmp_path / "r.h5ad")
    a = ad.read_h5ad(tmp_path / "r.h5ad")
    X, cells = Store.open(small_store).load("pca", where="label = 'resistant'")
    np.testing.assert_array_equal(a.obsm["X_pca"], X)
    assert list(a.obs["obs_name"]) == list(cells["obs_name"]) and set(a.obs["label"]) == {"resistant"}
    assert {"drug", "cancer_type", "sample", "patient"} <= set(a.obs.columns)
    assert a.obs_names[0] == f"{cells['dataset'][0]}:{cells['obs_name'][0]}"
    assert json.loads(a.uns["scdrugmap"]["provenance"])[0]["backbone"] == "pca"

    cli.ok("export", "--store", small_store, "--backbone", "pca", "--to", tmp_path / "all.parquet")
    t = pq.read_table(tmp_path / "all.parquet")
    assert t.num_rows == 800 and str(t.schema.field("X_pca").type) == "fixed_size_list<element: halffloat>[50]"
    assert {"dataset", "row", "obs_name", "label", "drug"} <= set(t.column_names)
    meta = json.loads(t.schema.metadata[b"scdrugmap"])
    assert meta["backbone"] == "pca" and len(meta["provenance"]) == 10


def test_npy_aligned_by_cell_ids_or_taken_in_store_order(cli, store_copy, tmp_path):
    st = store_copy()
    X, cells = load(st, "pca", dtype=np.float32)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(cells))
    np.save(tmp_path / "shuffled.npy", X[perm])
    (tmp_path / "ids.txt").write_text("\n".join(cells["obs_name"].to_numpy()[perm]) + "\n")
    msg = cli.ok("import-embeddings", "--store", st, "--dataset", DS, "--backbone", "api", "--from",
                 tmp_path / "shuffled.npy", "--cell-ids", tmp_path / "ids.txt", "--param", "model=web-api-v1").output
    assert "rows reordered" in msg and "(float32)" in msg
    np.testing.assert_array_equal(load(st, "api")[0], X)
    assert json.loads(Store.open(st).provenance("api")["params"][0])["model"] == "web-api-v1"

    np.save(tmp_path / "ordered.npy", X.astype(np.float64))
    msg = cli.ok("import-embeddings", "--store", st, "--dataset", DS, "--backbone", "plain", "--from",
                 tmp_path / "ordered.npy", "--dtype", "float16").output
    assert "rows taken in store order" in msg and "(float16)" in msg
    np.testing.assert_array_equal(load(st, "plain")[0], X.astype(np.float16))
    # replacing
    np.save(tmp_path / "other.npy", X + 1)
    cli.fails("import-embeddings", "--store", st, "--dataset", DS, "--backbone", "plain", "--from",
              tmp_path / "other.npy", match="--replace")
    assert "replaced" in cli.ok("import-embeddings", "--store", st, "--dataset", DS, "--backbone", "plain",
                                "--from", tmp_path / "other.npy", "--replace").output
    np.testing.assert_array_equal(load(st, "plain")[0], X + 1)
    arrays = list((st / "embeddings.zarr" / "plain" / DS).iterdir())
    assert len(arrays) == 1                             # the replaced array is gone


def _bad_inputs(tmp_path, X, names):
    n = len(names)
    np.save(tmp_path / "short.npy", X[:-1])
    np.save(tmp_path / "good.npy", X)
    np.save(tmp_path / "nan.npy", np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X))
    np.save(tmp_path / "dim8.npy", np.zeros((n, 8), dtype=np.float32))
    np.save(tmp_path / "big.npy", np.full(X.shape, 1e6, dtype=np.float32))
    np.save(tmp_path / "strings.npy", np.array([["a"] * 3] * n))
    (tmp_path / "unknown.txt").write_text("\n".join(["nope"] + list(names[1:])))
    (tmp_path / "dups.txt").write_text("\n".join([names[0]] + list(names[:-1])))
    (tmp_path / "short.txt").write_text("\n".join(names[:-1]))
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    obs = pd.DataFrame(index=pd.Index(names, name=None))
    a = ad.AnnData(obs=obs)
    a.obsm["X_one"] = X
    a.obsm["X_two"] = X
    a.write_h5ad(tmp_path / "two.h5ad")


@pytest.mark.parametrize("args, match", [
    (["--from", "{t}/short.npy"], "rows but dataset"),
    (["--from", "{t}/good.npy", "--cell-ids", "{t}/unknown.txt"], "are not cells of dataset"),
    (["--from", "{t}/good.npy", "--cell-ids", "{t}/dups.txt"], "twice"),
    (["--from", "{t}/good.npy", "--cell-ids", "{t}/short.txt"], "names but"),
    (["--from", "{t}/short.npy", "--cell-ids", "{t}/short.txt"], "cell names for dataset"),
    (["--from", "{t}/nan.npy"], "NaN"),
    (["--from", "{t}/big.npy", "--dtype", "float16"], "float16 range"),
    (["--from", "{t}/strings.npy"], "not numbers"),
    (["--from", "{t}/x.csv"], "unsupported file type"),
    (["--from", "{t}/missing.npy"], "does not exist"),
    (["--from", "{t}/two.h5ad"], "--key"),
    (["--from", "{t}/two.h5ad", "--key", "X_three"], "not an obsm key"),
    (["--from", "{t}/two.h5ad", "--key", "X_one", "--cell-col", "nope"], "not an obs column"),
    (["--from", "{t}/good.npy", "--key", "X"], "apply to .h5ad and .parquet"),
    (["--from", "{t}/good.npy", "--backbone", "pca"], "--replace"),
    (["--from", "{t}/dim8.npy", "--backbone", "pca", "--replace"], "dim 50"),
    (["--from", "{t}/good.npy", "--dataset", "nope"], "unknown dataset"),
    (["--from", "{t}/good.npy", "--backbone", "bad name!"], "invalid"),
])
def test_import_errors_leave_the_store_unchanged(cli, store_copy, tmp_path, args, match):
    st = store_copy()
    X, cells = load(st, "pca", dtype=np.float32)
    _bad_inputs(tmp_path, X, cells["obs_name"].to_numpy())
    full = {"--dataset": DS, "--backbone": "ext"}
    argv = [a.format(t=tmp_path) for a in args]
    for opt, value in full.items():
        if opt not in argv:
            argv += [opt, value]
    before = snapshot(st)
    cli.fails("import-embeddings", "--store", st, *argv, match=match)
    assert snapshot(st) == before


@pytest.mark.parametrize("args, match", [
    (["--backbone", "geneformer", "--to", "{t}/x.h5ad"], "has no embeddings"),
    (["--backbone", "pca", "--to", "{t}/x.csv"], "unsupported file type"),
    (["--backbone", "pca", "--to", "{t}/exists.h5ad"], "exists"),
    (["--backbone", "pca", "--to", "{t}/nodir/x.h5ad"], "does not exist"),
    (["--backbone", "pca", "--where", "dataset = 'none'", "--to", "{t}/x.h5ad"], "matches no cells"),
])
def test_export_errors_write_nothing(cli, small_store, tmp_path, args, match):
    (tmp_path / "exists.h5ad").write_text("keep me")
    before = snapshot(tmp_path), snapshot(small_store)
    cli.fails("export", "--store", small_store, *[a.format(t=tmp_path) for a in args], match=match)
    assert (snapshot(tmp_path), snapshot(small_store)) == before


def test_import_under_a_built_in_backbone_name_warns(cli, store_copy, tmp_path):
    """Importing under a built-in backbone's name works (a lab may hold that model's own embeddings) but says
    that scdrugmap did not compute them; another name gives no warning."""
    from scdrugmap.extract.registry import all_backbones

    st = store_copy()
    X, cells = load(st, "pca", dtype=np.float32)
    np.save(tmp_path / "emb.npy", X)
    builtin = next(b for b in all_backbones() if b != "pca")
    r = cli.ok("import-embeddings", "--store", st, "--dataset", DS, "--backbone", builtin, "--from",
               tmp_path / "emb.npy")
    assert f"'{builtin}' is the name of a built-in backbone" in r.stderr
    assert Store.open(st).provenance(builtin)["origin"].tolist() == ["external"]
    r = cli.ok("import-embeddings", "--store", st, "--dataset", DS, "--backbone", "lab-emb", "--from",
               tmp_path / "emb.npy")
    assert "built-in backbone" not in r.stderr
