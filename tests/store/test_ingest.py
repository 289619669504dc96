"""Ingest: validation before any write, label mapping, obs kept queryable, --replace."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import snapshot
from scdrugmap.store.ingest import map_labels
from scdrugmap.store.store import Store
from scdrugmap.errors import UserError


def make_h5ad(path, n=40, genes=None, X=None, labels=None, obs_names=None, extra_obs=None):
    rng = np.random.default_rng(0)
    genes = genes or [f"GENE{i}" for i in range(30)]
    X = X if X is not None else sp.csr_matrix(rng.poisson(1.0, size=(n, len(genes))).astype(np.float32))
    n = X.shape[0]
    obs = pd.DataFrame({"response": labels if labels is not None else ["sensitive", "resistant"] * (n // 2),
                        "sample_id": [f"s{i % 4}" for i in range(n)]},
                       index=obs_names if obs_names is not None else [f"c{i}" for i in range(n)])
    for k, v in (extra_obs or {}).items():
        obs[k] = v
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def ingest_args(path, store, dataset="d1", *extra):
    return ["ingest", path, "--store", store, "--dataset", dataset, "--label-col", "response", *extra]


def test_ingest_real_pc9_records_cells_and_source(cli, pc9, tmp_path):
    store = tmp_path / "st"
    out = cli.ok(*ingest_args(pc9, store, "pc9", "--sample-col", "sample_id", "--drug", "erlotinib",
                             "--cancer-type", "Lung cancer")).output
    assert "1,505 cells (379 sensitive, 1,126 resistant)" in out
    s = Store.open(store)
    ds = s.datasets().iloc[0]
    assert ds["gene_id_type"] == "symbol" and ds["value_kind"] == "counts"
    assert len(ds["source_sha256"]) == 64
    cells = s.sql("SELECT * FROM cohort ORDER BY row")
    assert len(cells) == 1505 and list(cells["row"]) == list(range(1505))
    assert cells["drug"].unique().tolist() == ["erlotinib"]
    assert set(cells["sample"]) == {"PC9_control", "PC9_erlotinib_day11"}
    # the other obs columns stay queryable by name
    assert s.sql("SELECT count(*) n FROM cohort WHERE condition = 'control'")["n"][0] == 379


def test_ingest_gbm_ensembl_and_explicit_labels(cli, gbm, tmp_path):
    store = tmp_path / "st"
    cli.ok(*ingest_args(gbm, store, "gbm", "--sensitive", "untreated", "--resistant", "panobinostat",
                        "--patient-col", "patient_id", "--sample-col", "sample_id"))
    s = Store.open(store)
    ds = s.datasets().iloc[0]
    assert ds["gene_id_type"] == "ensembl" and ds["symbol_col"] == "symbol"
    counts = s.sql("SELECT label, count(DISTINCT patient) p, count(*) n FROM cells GROUP BY label ORDER BY label")
    assert counts.to_dict("list") == {"label": ["resistant", "sensitive"], "p": [5, 5], "n": [2500, 2500]}
    assert s.sql("SELECT count(*) n FROM cohort WHERE gender = 'F'")["n"][0] == 1000


def test_map_labels_common_spellings_and_errors():
    m = map_labels(pd.Series(["Responder", "non-responder", "NON_RESPONDER"]))
    assert m == {"Responder": "sensitive", "non-responder": "resistant", "NON_RESPONDER": "resistant"}
    assert map_labels(pd.Series(["pre", "post"]), sensitive=["pre"], resistant=["post"]) == \
        {"pre": "sensitive", "post": "resistant"}
    with pytest.raises(UserError, match="'maybe'"):
        map_labels(pd.Series(["sensitive", "maybe"]))


def test_reingest_needs_replace_and_replace_drops_embeddings(cli, tmp_path):
    f = make_h5ad(tmp_path / "a.h5ad")
    store = tmp_path / "st"
    cli.ok(*ingest_args(f, store))
    (tmp_path / "panel.txt").write_text("\n".join(f"GENE{i}" for i in range(10)))
    cli.ok("extract", "--store", store, "--backbone", "hvg", "--option", f"panel={tmp_path / 'panel.txt'}")
    assert any((store / "embeddings.zarr" / "hvg").rglob("zarr.json"))
    before = snapshot(store)
    cli.fails(*ingest_args(f, store), match="already in the store")
    assert snapshot(store) == before
    cli.ok("probe", "--store", store, "--backbone", "hvg", "--group-by", "none", "--quiet")
    assert len(Store.open(store).sql("SELECT * FROM probe_results")) == 5
    out = cli.ok(*ingest_args(f, store, "d1", "--replace")).output
    assert out.startswith("replaced d1")
    s = Store.open(store)
    assert s.provenance().empty and len(s.sql("SELECT * FROM cells")) == 40
    assert s.sql("SELECT count(*) n FROM probe_runs")["n"][0] == 0
    assert s.sql("SELECT count(*) n FROM probe_results")["n"][0] == 0
    assert not any((store / "embeddings.zarr" / "hvg").rglob("zarr.json"))


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("not_h5ad", "not an .h5ad"),
    ("nan", "NaN/inf"),
    ("negative", "negative values"),
    ("noninteger", "non-integer values"),
    ("duplicates", "not unique"),
    ("no_label_col", "--label-col 'response' is not an obs column"),
    ("unmapped", "not mapped to sensitive/resistant"),
    ("bad_genes", "neither gene symbols nor Ensembl"),
])
def test_bad_input_is_one_line_exit_2_and_store_unchanged(cli, tmp_path, case, match):
    store = tmp_path / "st"
    good = make_h5ad(tmp_path / "good.h5ad")
    cli.ok(*ingest_args(good, store, "existing"))
    before = snapshot(store)
    path = tmp_path / f"{case}.h5ad"
    X = sp.csr_matrix(np.random.default_rng(1).poisson(1.0, size=(40, 30)).astype(np.float32))
    label_col = "response"
    if case == "missing":
        path = tmp_path / "nope.h5ad"
    elif case == "not_h5ad":
        path.write_text("cell,gene\n1,2\n")
    elif case in ("nan", "negative", "noninteger"):
        X = X.toarray()
        X[3, 4] = {"nan": np.nan, "negative": -1.0, "noninteger": 0.5}[case]
        make_h5ad(path, X=sp.csr_matrix(X))
    elif case == "duplicates":
        make_h5ad(path, obs_names=["c0"] * 2 + [f"c{i}" for i in range(2, 40)])
    elif case == "no_label_col":
        make_h5ad(path)
        label_col = "response"
        a = ad.read_h5ad(path)
        a.obs = a.obs.rename(columns={"response": "other"})
        a.write_h5ad(path)
    elif case == "unmapped":
        make_h5ad(path, labels=["sensitive", "maybe"] * 20)
    elif case == "bad_genes":
        make_h5ad(path, genes=[str(i) for i in range(30)])
    err = cli.fails("ingest", path, "--store", store, "--dataset", "new", "--label-col", label_col, match=match)
    assert snapshot(store) == before, err


def test_rejected_ingest_creates_no_store(cli, tmp_path):
    bad = make_h5ad(tmp_path / "bad.h5ad", labels=["x", "y"] * 20)
    cli.fails(*ingest_args(bad, tmp_path / "new-store"), match="not mapped")
    assert not (tmp_path / "new-store").exists()


def test_values_normalized_accepted_when_declared(cli, tmp_path):
    X = sp.csr_matrix(np.random.default_rng(2).random((40, 30)).astype(np.float32))
    f = make_h5ad(tmp_path / "norm.h5ad", X=X)
    cli.ok(*ingest_args(f, tmp_path / "st", "d1", "--values", "normalized"))
    assert Store.open(tmp_path / "st").datasets()["value_kind"][0] == "normalized"


def test_one_label_dataset_ingests_with_warning(cli, tmp_path):
    f = make_h5ad(tmp_path / "one.h5ad", labels=["resistant"] * 40)
    result = cli.ok(*ingest_args(f, tmp_path / "st"))
    assert "only 'resistant' cells" in result.stderr


def test_store_option_from_env(cli, tmp_path):
    f = make_h5ad(tmp_path / "a.h5ad")
    cli.ok("ingest", f, "--dataset", "d1", "--label-col", "response", env={"SCDRUGMAP_STORE": str(tmp_path / "st")})
    assert Store.open(tmp_path / "st").dataset_names() == ["d1"]


def test_not_a_store_directory(cli, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    before = snapshot(tmp_path / "plain")
    cli.fails("query", "--store", tmp_path / "plain", "SELECT 1", match="not a scdrugmap store")
    f = make_h5ad(tmp_path / "a.h5ad")
    cli.fails(*ingest_args(f, tmp_path / "plain"), match="not a scdrugmap store")
    assert snapshot(tmp_path / "plain") == before


@pytest.mark.parametrize("n_genes, words", [(1, "1 gene ("), (2, "2 genes (")])
def test_ingest_message_counts_genes_in_good_english(cli, tmp_path, n_genes, words):
    f = make_h5ad(tmp_path / "g.h5ad", genes=[f"GENE{i}" for i in range(n_genes)])
    assert words in cli.ok(*ingest_args(f, tmp_path / "st")).output
