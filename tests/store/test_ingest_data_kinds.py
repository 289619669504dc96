"""Data that must go in: scaled (z-scored) matrices, counts kept in layers['counts'] or .raw,
cells without labels, and embeddings-only datasets; built from the shared PC9 data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdrugmap.errors import UserError
from scdrugmap.extract import registry
from scdrugmap.extract.panel import load_panel
from scdrugmap.store.store import Store
from tests.conftest import snapshot

N_CELLS = 300


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    """300 PC9 cells (both classes) x the L1000 panel genes present plus 1,000 others: raw counts."""
    from tests.conftest import PC9, need_shared
    a = ad.read_h5ad(need_shared(PC9))
    rng = np.random.default_rng(0)
    cells = np.sort(np.concatenate([rng.choice(np.flatnonzero(a.obs["response"] == c), N_CELLS // 2, replace=False)
                                    for c in ("sensitive", "resistant")]))
    panel = set(load_panel("l1000").symbols)
    names = np.asarray(a.var_names, dtype=str)
    in_panel = np.flatnonzero(np.isin(np.char.upper(names.astype(str)), list(panel)))
    others = rng.choice(np.setdiff1d(np.arange(a.n_vars), in_panel), 1000, replace=False)
    genes = np.sort(np.concatenate([in_panel, others]))
    small = a[cells, genes].copy()
    small.X = sp.csr_matrix(small.X, dtype=np.float32)
    assert len(in_panel) > 500
    return small


def lognorm(X) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    return sp.csr_matrix(np.log1p(sp.diags(1e4 / totals) @ X), dtype=np.float32)


def zscore(X) -> np.ndarray:
    dense = lognorm(X).toarray()
    sd = dense.std(axis=0)
    return ((dense - dense.mean(axis=0)) / np.where(sd > 0, sd, 1)).astype(np.float32)


def write(adata, path):
    adata.write_h5ad(path)
    return path


def ingest(cli, path, store, dataset, *extra):
    return cli.ok("ingest", path, "--store", store, "--dataset", dataset, *extra, "--quiet")


def dataset_row(store, name) -> dict:
    ds = Store.open(store).datasets()
    return ds[ds["dataset"] == name].iloc[0].to_dict()


def load(store, backbone, dataset):
    X, _ = Store.open(store).load(backbone, datasets=[dataset], dtype=np.float32)
    return X


# ---- 1. scaled values ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scaled_store(pc9_small, tmp_path_factory):
    """A store with a counts dataset and the same cells z-scored (--values scaled)."""
    from click.testing import CliRunner
    from scdrugmap.cli import main
    root = tmp_path_factory.mktemp("scaled")
    counts = write(pc9_small, root / "counts.h5ad")
    z = pc9_small.copy()
    z.X = zscore(pc9_small.X)
    scaled = write(z, root / "zscored.h5ad")
    store = root / "st"
    run = CliRunner()
    for args in (["ingest", counts, "--dataset", "counts", "--label-col", "response"],
                 ["ingest", scaled, "--dataset", "z", "--label-col", "response", "--values", "scaled"]):
        r = run.invoke(main, [str(a) for a in args] + ["--store", str(store), "--quiet"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    return store, scaled, z


def test_negative_values_without_values_scaled_are_refused_suggesting_it(cli, scaled_store, tmp_path):
    store, scaled, _ = scaled_store
    before = snapshot(store)
    err = cli.fails("ingest", scaled, "--store", store, "--dataset", "z2", "--label-col", "response",
                    match="negative values")
    assert "--values scaled" in err
    # declared as another kind, negative values are refused too
    cli.fails("ingest", scaled, "--store", store, "--dataset", "z2", "--label-col", "response",
              "--values", "log1p", match="--values scaled")
    assert snapshot(store) == before


def test_scaled_dataset_records_its_kind_and_hvg_pca_use_the_values_as_given(cli, scaled_store, tmp_path):
    store, _, z = scaled_store
    st = tmp_path / "st"
    import shutil
    shutil.copytree(store, st)
    assert dataset_row(st, "z")["value_kind"] == "scaled"
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--backbone", "pca", "--quiet")
    hvg = load(st, "hvg", "z")
    panel = load_panel("l1000")
    where = {s: i for i, s in enumerate(panel.symbols)}
    symbols = np.char.upper(np.asarray(z.var_names, dtype=str))
    col = next(i for i, s in enumerate(symbols) if s in where)
    # the panel feature of a scaled dataset is the z-score itself (float16 storage)
    np.testing.assert_allclose(hvg[:, where[symbols[col]]], z.X[:, col], atol=2e-2, rtol=1e-3)
    assert (hvg < 0).any()
    prov = Store.open(st).provenance("hvg")
    params = json.loads(prov[prov["dataset"] == "z"]["params"].iloc[0])
    assert params["value_kind"] == "scaled"
    assert load(st, "pca", "z").shape == (N_CELLS, 50)
    out = cli.ok("probe", "--store", st, "--backbone", "hvg", "--where", "dataset = 'z'", "--quiet").output
    assert "auroc" in out.lower()


@pytest.mark.parametrize("backbone", sorted(n for n, c in registry.all_backbones().items()
                                            if c.value_kinds == ("counts",)))
def test_count_backbones_refuse_scaled_values_in_one_line(cli, scaled_store, backbone, tmp_path):
    store, _, _ = scaled_store
    before = snapshot(store)
    err = cli.fails("extract", "--store", store, "--backbone", backbone, "--dataset", "z",
                    "--model-dir", tmp_path, "--quiet", match=f"backbone '{backbone}' needs raw counts")
    assert "dataset 'z' holds scaled values" in err and "--layer counts" in err
    assert snapshot(store) == before


def test_import_embeddings_works_on_a_scaled_dataset(cli, scaled_store, tmp_path):
    store, _, _ = scaled_store
    import shutil
    st = tmp_path / "st"
    shutil.copytree(store, st)
    E = np.random.default_rng(1).normal(size=(N_CELLS, 16)).astype(np.float32)
    np.save(tmp_path / "e.npy", E)
    cli.ok("import-embeddings", "--store", st, "--dataset", "z", "--backbone", "api", "--from", tmp_path / "e.npy",
           "--dtype", "float32")
    np.testing.assert_array_equal(load(st, "api", "z"), E)


# ---- 2. counts in layers['counts'] or .raw ---------------------------------------------------
def _lognorm_with(pc9_small, where: str):
    """X log-normalised on a gene subset (as after scanpy's HVG selection), raw counts kept in
    layers['counts'] (same genes as X) or .raw (every gene, as ``adata.raw = adata`` keeps)."""
    full = pc9_small.copy()
    if where == "raw":
        full.raw = full                               # raw counts, all genes
    sub = full[:, : full.n_vars // 2].copy() if where == "raw" else full.copy()
    if where in ("layer", "both"):
        sub.layers["counts"] = sub.X.copy()
    if where == "both":
        sub.raw = sub
    sub.X = lognorm(sub.X)
    return sub


def test_counts_layer_is_detected_used_and_recorded(cli, pc9_small, tmp_path):
    path = write(_lognorm_with(pc9_small, "layer"), tmp_path / "layer.h5ad")
    out = ingest(cli, path, tmp_path / "st", "ln", "--label-col", "response").output
    assert "X holds non-integer values, so the raw counts in layers['counts'] are used" in out
    row = dataset_row(tmp_path / "st", "ln")
    assert (row["source_layer"], row["value_kind"]) == ("counts", "counts")
    # declared values take X as given
    ingest(cli, path, tmp_path / "st", "ln2", "--label-col", "response", "--values", "log1p")
    row = dataset_row(tmp_path / "st", "ln2")
    assert row["source_layer"] is None and row["value_kind"] == "log1p"


def test_raw_is_detected_and_extraction_reads_its_genes(cli, pc9_small, tmp_path):
    st = tmp_path / "st"
    path = write(_lognorm_with(pc9_small, "raw"), tmp_path / "raw.h5ad")
    out = ingest(cli, path, st, "viaraw", "--label-col", "response").output
    assert "raw counts in .raw are used" in out and f"{pc9_small.n_vars:,} genes" in out
    row = dataset_row(st, "viaraw")
    assert (row["source_layer"], row["value_kind"], row["n_genes"]) == (".raw", "counts", pc9_small.n_vars)
    ingest(cli, write(pc9_small, tmp_path / "plain.h5ad"), st, "plain", "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--quiet")
    # .raw holds every gene: the panel features equal those of the same counts given as X
    np.testing.assert_array_equal(load(st, "hvg", "viaraw"), load(st, "hvg", "plain"))


def test_use_raw_explicitly_and_its_refusals(cli, pc9_small, tmp_path):
    st = tmp_path / "st"
    raw_file = write(_lognorm_with(pc9_small, "raw"), tmp_path / "raw.h5ad")
    ingest(cli, raw_file, st, "a", "--label-col", "response", "--use-raw")
    assert dataset_row(st, "a")["source_layer"] == ".raw"
    before = snapshot(st)
    both = write(_lognorm_with(pc9_small, "both"), tmp_path / "both.h5ad")
    err = cli.fails("ingest", both, "--store", st, "--dataset", "b", "--label-col", "response",
                    match="both layers['counts'] and .raw hold raw counts")
    assert "--layer counts or --use-raw" in err
    cli.fails("ingest", write(pc9_small, tmp_path / "plain.h5ad"), "--store", st, "--dataset", "b",
              "--label-col", "response", "--use-raw", match="the file has no .raw")
    cli.fails("ingest", both, "--store", st, "--dataset", "b", "--label-col", "response", "--use-raw",
              "--layer", "counts", match="give one of them")
    lognorm_only = pc9_small.copy()
    lognorm_only.X = lognorm(lognorm_only.X)
    cli.fails("ingest", write(lognorm_only, tmp_path / "ln.h5ad"), "--store", st, "--dataset", "b",
              "--label-col", "response", match="non-integer values, so it is not raw counts")
    assert snapshot(st) == before
    # the ambiguous file goes in once the matrix is named
    ingest(cli, both, st, "b", "--label-col", "response", "--layer", "counts")
    assert dataset_row(st, "b")["source_layer"] == "counts"


# ---- 3. cells without labels -----------------------------------------------------------------
def test_unlabelled_cells_are_extracted_and_predicted_never_trained_or_scored(cli, pc9_small, gbm, tmp_path):
    st = tmp_path / "st"
    ingest(cli, write(pc9_small, tmp_path / "pc9.h5ad"), st, "pc9", "--label-col", "response")
    out = cli.ok("ingest", gbm, "--store", st, "--dataset", "gbm", "--quiet")
    assert "5,000 unlabelled" in out.output and "no labels" in out.stderr
    row = dataset_row(st, "gbm")
    assert row["label_col"] is None and (row["n_sensitive"], row["n_resistant"]) == (0, 0)
    s = Store.open(st)
    assert s.sql("SELECT count(*) n FROM cells WHERE dataset = 'gbm' AND label IS NULL")["n"][0] == 5000
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--quiet")
    assert load(st, "hvg", "gbm").shape == (5000, 978)

    out = cli.ok("probe", "--store", st, "--backbone", "hvg", "--quiet").output
    assert "5,000 unlabelled cells of the selection were left out" in out
    runs = Store.open(st).sql("SELECT n_cells, datasets FROM probe_runs")
    assert runs["n_cells"].tolist() == [N_CELLS] and list(runs["datasets"][0]) == ["pc9"]

    before = snapshot(st)
    cli.fails("probe", "--store", st, "--backbone", "hvg", "--where", "dataset = 'gbm'", "--quiet",
              match="have no sensitive/resistant label, so there is nothing to train or score")
    cli.fails("fit", "--store", st, "--backbone", "hvg", "--where", "dataset = 'gbm'", "--quiet",
              match="no labelled cells")
    assert snapshot(st) == before

    cli.ok("fit", "--store", st, "--backbone", "hvg", "--quiet")
    fitted = Store.open(st).sql("SELECT n_cells FROM models")["n_cells"].tolist()
    assert fitted == [N_CELLS]                        # fitted on the labelled cells only
    cli.ok("predict", "--store", st, "--model", "hvg-lr", "--dataset", "gbm", "--csv", tmp_path / "p.csv",
           "--quiet")
    pred = pd.read_csv(tmp_path / "p.csv")
    assert len(pred) == 5000 and pred.filter(like="score").notna().all().all()


def test_label_column_with_empty_values_keeps_those_cells_unlabelled(cli, pc9_small, tmp_path):
    a = pc9_small.copy()
    labels = a.obs["response"].astype(object).to_numpy()
    labels[:25] = None
    labels[25:30] = ""
    a.obs["response"] = pd.Categorical(labels)
    res = cli.ok("ingest", write(a, tmp_path / "holes.h5ad"), "--store", tmp_path / "st", "--dataset", "h",
                 "--label-col", "response", "--quiet")
    assert "30 cells have no value in label column 'response'" in res.stderr
    s = Store.open(tmp_path / "st")
    got = s.sql("SELECT count(*) FILTER (WHERE label IS NULL) n_null, count(*) FILTER (WHERE label_raw IS NULL) "
                "n_raw_null, count(*) n FROM cells")
    assert got.iloc[0].tolist() == [30, 30, N_CELLS]
    row = dataset_row(tmp_path / "st", "h")
    assert row["n_sensitive"] + row["n_resistant"] == N_CELLS - 30
    assert "30 unlabelled" in res.output
    # a column with no value at all is refused
    a.obs["empty"] = pd.Categorical([None] * a.n_obs, categories=["x"])
    before = snapshot(tmp_path / "st")
    cli.fails("ingest", write(a, tmp_path / "holes2.h5ad"), "--store", tmp_path / "st", "--dataset", "h2",
              "--label-col", "empty", match="leave out --label-col")
    cli.fails("ingest", tmp_path / "holes2.h5ad", "--store", tmp_path / "st", "--dataset", "h2",
              "--sensitive", "x", match="--sensitive/--resistant need --label-col")
    assert snapshot(tmp_path / "st") == before


# ---- 4. embeddings-only datasets ------------------------------------------------------------
def _obs_only(pc9_small, tmp_path, kind: str):
    if kind == "h5ad":
        empty = ad.AnnData(X=sp.csr_matrix((pc9_small.n_obs, 0), dtype=np.float32), obs=pc9_small.obs.copy())
        return write(empty, tmp_path / "cells.h5ad")
    path = tmp_path / "cells.csv"
    pc9_small.obs.to_csv(path)
    return path


@pytest.mark.parametrize("kind", ["h5ad", "csv"])
def test_embeddings_only_dataset_is_served_by_import_embeddings(cli, pc9_small, tmp_path, kind):
    st = tmp_path / "st"
    path = _obs_only(pc9_small, tmp_path, kind)
    out = ingest(cli, path, st, "api", "--label-col", "response", "--sample-col", "sample_id").output
    assert "embeddings-only" in out and "0 genes" in out
    row = dataset_row(st, "api")
    assert (row["n_genes"], row["value_kind"], row["gene_id_type"]) == (0, "none", "none")
    assert row["n_sensitive"] == row["n_resistant"] == N_CELLS // 2
    info = json.loads(cli.ok("store", "info", st, "--json").output)
    assert [(d["dataset"], d["genes"], d["values"]) for d in info["datasets"]] == [("api", 0, "none")]

    before = snapshot(st)
    for backbone in ("hvg", "pca", "geneformer"):
        err = cli.fails("extract", "--store", st, "--backbone", backbone, "--model-dir", tmp_path, "--quiet",
                        match="needs expression, but dataset 'api' has none (embeddings-only)")
        assert "scdrugmap import-embeddings" in err
    cli.fails("ingest", path, "--store", st, "--dataset", "api2", "--label-col", "response", "--values", "scaled",
              match="the file has no genes")
    assert snapshot(st) == before

    E = np.random.default_rng(2).normal(size=(N_CELLS, 24)).astype(np.float32)
    E[pc9_small.obs["response"].to_numpy() == "resistant", 0] += 3     # a separable signal
    np.save(tmp_path / "e.npy", E)
    (tmp_path / "ids.txt").write_text("\n".join(pc9_small.obs_names) + "\n")
    cli.ok("import-embeddings", "--store", st, "--dataset", "api", "--backbone", "webapi", "--from",
           tmp_path / "e.npy", "--cell-ids", tmp_path / "ids.txt", "--dtype", "float32")
    np.testing.assert_array_equal(load(st, "webapi", "api"), E)
    cli.ok("probe", "--store", st, "--backbone", "webapi", "--group-by", "none", "--quiet")
    auroc = Store.open(st).sql("SELECT avg(auroc) v FROM probe_results WHERE status = 'ok'")["v"][0]
    assert auroc > 0.9


def test_embeddings_only_datasets_listing_shows_zero_genes(cli, pc9_small, tmp_path):
    st = tmp_path / "st"
    ingest(cli, _obs_only(pc9_small, tmp_path, "h5ad"), st, "api", "--label-col", "response")
    out = cli.ok("query", "--store", st, "SELECT dataset, n_genes, value_kind FROM datasets").output
    assert "api" in out and "none" in out


def test_scaled_x_with_a_counts_layer_uses_the_counts(cli, pc9_small, tmp_path):
    a = pc9_small.copy()
    a.layers["counts"] = a.X.copy()
    a.X = zscore(a.X)                                 # scanpy's sc.pp.scale after keeping the counts
    st = tmp_path / "st"
    out = ingest(cli, write(a, tmp_path / "scaled_counts.h5ad"), st, "s", "--label-col", "response").output
    assert "X holds negative values, so the raw counts in layers['counts'] are used" in out
    assert dataset_row(st, "s")["source_layer"] == "counts"
    # said to be scaled, X is taken as it is
    ingest(cli, tmp_path / "scaled_counts.h5ad", st, "s2", "--label-col", "response", "--values", "scaled")
    row = dataset_row(st, "s2")
    assert row["source_layer"] is None and row["value_kind"] == "scaled"


def test_a_backbone_declared_with_needs_counts_false_reads_non_count_values():
    class Legacy(registry.Backbone):
        name = "legacy-test"
        needs_counts = False

    class Counting(registry.Backbone):
        name = "counting-test"

    assert Legacy.value_kinds == ("counts", "normalized", "log1p") and not Legacy.needs_counts
    assert Counting.needs_counts and Counting.value_kinds == ("counts",)
    Legacy.check_values([{"dataset": "d", "value_kind": "log1p"}])
    with pytest.raises(UserError, match="needs raw counts, but datasets 'a', 'b' hold log1p/scaled values"):
        Counting.check_values([{"dataset": "a", "value_kind": "scaled"}, {"dataset": "b", "value_kind": "log1p"}])
