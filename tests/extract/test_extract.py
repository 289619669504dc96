"""Extraction runner, registry and the baseline backbones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import snapshot
from scdrugmap.errors import UserError
from scdrugmap.extract import registry
from scdrugmap.extract.panel import load_panel, panel_columns, panel_features
from scdrugmap.extract.runner import extract
from scdrugmap.store.store import Store


@pytest.fixture
def pc9_store(cli, pc9, tmp_path):
    path = tmp_path / "st"
    cli.ok("ingest", pc9, "--store", path, "--dataset", "pc9", "--label-col", "response", "--sample-col", "sample_id")
    return path


def test_panel_features_by_hand():
    """3 cells x 4 genes: counts per 10k of the cell's total over all genes, then log1p."""
    panel_file_genes = np.array(["A", "b", "C", "D"])   # source gene order; matching is case-insensitive
    counts = sp.csr_matrix(np.array([[1, 1, 0, 2],
                                     [0, 0, 0, 0],
                                     [5, 0, 5, 0]], dtype=np.float32))
    from scdrugmap.extract.panel import Panel
    panel = Panel("t", ("C", "B", "Z"), {"A": 1}, "x")   # 'A' is an older name of panel gene 'B'
    src, dst = panel_columns(panel, panel_file_genes)
    assert src.tolist() == [0, 2] and dst.tolist() == [1, 0]  # A -> B (alias wins first), C -> C; b is a 2nd match
    out = panel_features(counts, src, dst, 3, "counts")
    expected = np.array([[np.log1p(0), np.log1p(1 / 4 * 1e4), 0],
                         [0, 0, 0],
                         [np.log1p(5 / 10 * 1e4), np.log1p(5 / 10 * 1e4), 0]], dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_default_panel_is_l1000():
    panel = load_panel()
    assert len(panel) == 978 and "EGFR" in panel.symbols and panel.aliases["CD97"] == panel.symbols.index("ADGRE5")


def test_backbones_command_lists_baselines(cli):
    out = cli.ok("backbones").output
    assert "hvg" in out and "pca" in out and "978" in out and "50" in out


def test_extract_reports_and_skips(cli, pc9_store):
    out = cli.ok("extract", "--store", pc9_store, "--backbone", "hvg", "--quiet").output
    assert "hvg · pc9: 1,505 cells x 978 (float16)" in out
    before = snapshot(pc9_store)
    out = cli.ok("extract", "--store", pc9_store, "--backbone", "hvg", "--quiet").output
    assert "already extracted" in out
    assert snapshot(pc9_store) == before
    prov = Store.open(pc9_store).provenance("hvg").iloc[0]
    params = json.loads(prov["params"])
    assert params["panel_genes_found"] > 880 and params["panel"] == "l1000"
    assert prov["scdrugmap_version"] and prov["dim"] == 978 and prov["chunk_rows"] == 4096


def test_force_replaces_array_and_float32(cli, pc9_store):
    cli.ok("extract", "--store", pc9_store, "--backbone", "hvg", "--quiet")
    old = Store.open(pc9_store).provenance("hvg")["array_path"][0]
    cli.ok("extract", "--store", pc9_store, "--backbone", "hvg", "--dtype", "float32", "--force", "--quiet")
    s = Store.open(pc9_store)
    new = s.provenance("hvg")["array_path"][0]
    assert new != old and not (pc9_store / "embeddings.zarr" / old).exists()
    X, _ = s.load("hvg")
    assert X.dtype == np.float32


def test_pca_fit_is_shared_and_reused(cli, pc9_store, gbm):
    cli.ok("extract", "--store", pc9_store, "--backbone", "pca", "--quiet")
    cli.ok("ingest", gbm, "--store", pc9_store, "--dataset", "gbm", "--label-col", "response",
           "--sensitive", "untreated", "--resistant", "panobinostat")
    cli.ok("extract", "--store", pc9_store, "--backbone", "pca", "--quiet")
    prov = Store.open(pc9_store).provenance("pca")
    params = [json.loads(p) for p in prov["params"]]
    assert {p["fit_id"] for p in params} == {params[0]["fit_id"]}          # gbm projected with pc9's fit
    assert all(p["fitted_on"] == ["pc9"] for p in params)
    cli.ok("extract", "--store", pc9_store, "--backbone", "pca", "--force", "--quiet")  # all redone -> refit
    params = [json.loads(p) for p in Store.open(pc9_store).provenance("pca")["params"]]
    assert all(p["fitted_on"] == ["gbm", "pc9"] for p in params)
    cli.fails("extract", "--store", pc9_store, "--backbone", "pca", "--dataset", "gbm", "--force",
              "--option", "n_components=10", "--quiet", match="n_components=50, not 10")


@pytest.mark.parametrize("args, match", [
    (["--backbone", "nope"], "unknown backbone 'nope'"),
    (["--backbone", "hvg", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["--backbone", "hvg", "--option", "nope=1"], "unknown option(s) nope"),
    (["--backbone", "pca", "--option", "n_components=abc"], "expected a int"),
    (["--backbone", "hvg", "--option", "panel"], "must be NAME=VALUE"),
])
def test_extract_bad_input(cli, pc9_store, args, match):
    before = snapshot(pc9_store)
    cli.fails("extract", "--store", pc9_store, *args, "--quiet", match=match)
    assert snapshot(pc9_store) == before


def test_source_modified_after_ingest_is_refused(cli, pc9, copy_of, tmp_path):
    f = copy_of(pc9, "mine.h5ad")
    st = tmp_path / "st2"
    cli.ok("ingest", f, "--store", st, "--dataset", "pc9", "--label-col", "response")
    with open(f, "ab") as fh:
        fh.write(b"\0")
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "hvg", "--quiet", match="changed after ingest")
    assert snapshot(st) == before
    f.unlink()
    cli.fails("extract", "--store", st, "--backbone", "hvg", "--quiet", match="is missing")


def test_no_gene_overlap_is_refused(cli, pc9_store, tmp_path):
    (tmp_path / "panel.txt").write_text("NOTAGENE1\nNOTAGENE2\n")
    before = snapshot(pc9_store)
    cli.fails("extract", "--store", pc9_store, "--backbone", "hvg", "--option", f"panel={tmp_path / 'panel.txt'}",
              "--quiet", match="shares no gene")
    assert snapshot(pc9_store) == before


def test_counts_only_backbone_refuses_normalized(cli, tmp_path):
    """A backbone declaring needs_counts refuses a dataset ingested with --values normalized."""
    import anndata as ad
    import pandas as pd

    @registry.register
    class NeedsCounts(registry.Backbone):
        name = "test-needs-counts"
        needs_counts = True

    X = sp.csr_matrix(np.random.default_rng(0).random((10, 5)).astype(np.float32))
    ad.AnnData(X=X, obs=pd.DataFrame({"r": ["sensitive", "resistant"] * 5}, index=[f"c{i}" for i in range(10)]),
               var=pd.DataFrame(index=[f"G{i}" for i in range(5)])).write_h5ad(tmp_path / "n.h5ad")
    st = tmp_path / "st"
    cli.ok("ingest", tmp_path / "n.h5ad", "--store", st, "--dataset", "n", "--label-col", "r", "--values", "normalized")
    try:
        with pytest.raises(UserError, match="needs raw counts"):
            extract(Store.open(st), "test-needs-counts", show_progress=False)
    finally:
        registry._REGISTRY.pop("test-needs-counts")


def test_plugin_module_from_env(cli):
    env = {"SCDRUGMAP_PLUGINS": "no_such_module_xyz"}
    registry._LOADED = False
    try:
        cli.fails("backbones", env=env, match="cannot be imported")
    finally:
        registry._LOADED = False
