"""Tests of the cohort simulator: the paper table, count realism, labels, signal and batch."""

import types

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from scdrugmap.simulate import (
    GENE_SYMBOLS,
    PAPER_DATASETS,
    default_genes,
    paper_table,
    simulate_cohort,
    simulate_paper_collection,
    write_cohort,
)

# Regimen rows of the paper's Supplementary Table 2 that span several datasets:
# datasets -> (cells, sensitive, resistant).
MULTI_DATASET_REGIMENS = {
    ("Data1", "Data2"): (3421, 931, 2490),
    ("Data3", "Data4"): (34788, 13069, 21719),
    ("Data5", "Data6"): (33477, 23734, 9743),
    ("Data8", "Data27"): (9171, 3039, 6132),
    ("Data16", "Data20", "Data21"): (23657, 12406, 11251),
    ("Data25", "Data26"): (24834, 11177, 13657),
}
# Aggregate rows of Supplementary Table 2 the table must reproduce.
AGGREGATES = {
    "tissue": {
        "Bone marrow aspirate": (73896, 38918, 34978),
        "Cell line": (132447, 55483, 76964),
        "Peripheral blood mononuclear cells": (50533, 24434, 26099),
        "Tumor tissue": (69875, 44122, 25753),
    },
    "therapy": {
        "Targeted therapy": (243856, 118794, 125062),
        "Immunotherapy": (6303, 2631, 3672),
        "Chemotherapy": (76592, 41532, 35060),
    },
    "cancer_type": {
        "Lung cancer": (72431, 41732, 30699),
        "Melanoma": (48125, 23344, 24781),
        "Multiple myeloma": (72010, 37742, 34268),
    },
}


def _sums(rows):
    return tuple(int(sum(getattr(r, k) for r in rows)) for k in ("cells", "sensitive", "resistant"))


# ------------------------------------------------------------------------------ paper table


def test_paper_table_totals():
    assert [r.name for r in PAPER_DATASETS] == [f"Data{i}" for i in range(1, 37)]
    assert _sums(PAPER_DATASETS) == (326_751, 162_957, 163_794)
    for r in PAPER_DATASETS:
        assert r.cells == r.sensitive + r.resistant
        assert r.n_samples == r.n_sensitive_samples + r.n_resistant_samples
        assert r.sensitive > 0 and r.resistant > 0
        assert r.n_sensitive_samples > 0 and r.n_resistant_samples > 0
        assert r.tissue and r.cancer_type and r.therapy and r.regimen
    by_name = {r.name: r for r in PAPER_DATASETS}
    assert _sums([by_name["Data19"]]) == (61_001, 37_661, 23_340)
    assert by_name["Data5"].n_samples == 28  # catalog Sample_size_all


def test_paper_table_regimen_splits_add_up():
    by_name = {r.name: r for r in PAPER_DATASETS}
    for names, expected in MULTI_DATASET_REGIMENS.items():
        assert _sums([by_name[n] for n in names]) == expected, names
        assert len({by_name[n].regimen for n in names}) == 1


def test_paper_table_reproduces_aggregate_rows():
    for field, rows in AGGREGATES.items():
        for value, expected in rows.items():
            assert _sums([r for r in PAPER_DATASETS if getattr(r, field) == value]) == expected


def test_paper_table_frame():
    df = paper_table()
    assert df.shape[0] == 36 and df.index[0] == "Data1"
    assert int(df["cells"].sum()) == 326_751


# ------------------------------------------------------------------------------ genes


def test_gene_symbols():
    assert len(GENE_SYMBOLS) == len(set(GENE_SYMBOLS)) >= 2000
    for g in ("ACTB", "GAPDH", "EGFR", "ABCB1", "MT-CO1", "RPL13A", "CD19"):
        assert g in GENE_SYMBOLS
    assert default_genes(5) == list(GENE_SYMBOLS[:5])
    padded = default_genes(len(GENE_SYMBOLS) + 2)
    assert padded[-2:] == [f"GENE{len(GENE_SYMBOLS)}", f"GENE{len(GENE_SYMBOLS) + 1}"]


def test_custom_genes_become_var_names():
    genes = ["EGFR", "KRAS", "ACTB", "MYC", "TP53", "XYZ1"] + [f"G{i}" for i in range(30)]
    (_, adata, _), = simulate_cohort(n_datasets=1, cells_per_dataset=40, genes=genes)
    assert list(adata.var_names) == genes
    with pytest.raises(ValueError, match="duplicates"):
        simulate_cohort(n_datasets=1, genes=["A", "B", "A"])


# ------------------------------------------------------------------------------ counts & obs


@pytest.fixture(scope="module")
def small_cohort():
    return simulate_cohort(n_datasets=4, cells_per_dataset=300, samples_per_dataset=6,
                           n_genes=300, seed=3)


def test_counts_are_sparse_nonnegative_integers(small_cohort):
    for name, adata, meta in small_cohort:
        X = adata.X
        assert sp.issparse(X) and X.format == "csr" and X.dtype == np.int32
        assert X.data.min() >= 0
        assert 0.05 < X.nnz / np.prod(X.shape) < 0.6  # sparse, as scRNA-seq is
        totals = np.asarray(X.sum(axis=1)).ravel()
        assert totals.min() > 0 and 200 < np.median(totals) < 5000
        # Overdispersion: variance well above the mean for expressed genes.
        dense = X.toarray().astype(float)
        mean, var = dense.mean(0), dense.var(0)
        expressed = mean > 1
        assert np.median(var[expressed] / mean[expressed]) > 1.5
        assert {"drug", "cancer_type", "tissue", "therapy", "regimen"} <= set(meta)
        assert adata.uns["dataset"]["regimen"] == meta["regimen"]
        assert len(adata.uns["simulation"]["response_genes"]) > 0


def test_obs_columns_and_unique_cell_names(small_cohort):
    names = []
    for name, adata, _ in small_cohort:
        for col in ("response", "sample_id", "patient_id", "condition"):
            assert col in adata.obs
        assert set(adata.obs["response"].unique()) == {"sensitive", "resistant"}
        assert all(c.startswith(name) for c in adata.obs_names)
        names.extend(adata.obs_names)
    assert len(names) == len(set(names))


def test_labels_are_sample_level(small_cohort):
    designs = set()
    for _, adata, _ in small_cohort:
        obs = adata.obs
        assert (obs.groupby("sample_id", observed=True)["response"].nunique() == 1).all()
        assert obs["sample_id"].nunique() == 6
        per_patient = obs.groupby("patient_id", observed=True)["response"].nunique()
        if (per_patient == 1).all():
            designs.add("patient")  # responders / non-responders
        else:
            designs.add("cell line")  # pre-treatment sensitive, post-treatment resistant
            pre = obs["condition"] == "pre-treatment"
            assert (obs.loc[pre, "response"] == "sensitive").all()
            assert (obs.loc[~pre, "response"] == "resistant").all()
    assert designs == {"patient", "cell line"}


def test_reproducible():
    kw = dict(n_datasets=2, cells_per_dataset=120, n_genes=200)
    a = simulate_cohort(seed=7, **kw)
    b = simulate_cohort(seed=7, **kw)
    c = simulate_cohort(seed=8, **kw)
    for (_, x, _), (_, y, _) in zip(a, b):
        assert (x.X != y.X).nnz == 0
        assert x.obs.equals(y.obs)
    assert any(x.X.shape != z.X.shape or (x.X != z.X).nnz > 0
               for (_, x, _), (_, z, _) in zip(a, c))


def test_bad_parameters():
    with pytest.raises(ValueError):
        simulate_cohort(samples_per_dataset=1)
    with pytest.raises(ValueError):
        simulate_cohort(resistant_fraction=1.0)
    with pytest.raises(ValueError):
        simulate_cohort(effect=-1)
    with pytest.raises(ValueError):
        simulate_paper_collection(scale=0)


# ------------------------------------------------------------------------------ signal & batch


def _log_norm(adata):
    X = adata.X.astype(np.float64)
    X = sp.csr_matrix(X.multiply(1e4 / np.asarray(X.sum(axis=1))))
    X.data = np.log1p(X.data)
    return X


def _auroc(X, y, train):
    clf = LogisticRegression(C=0.1, max_iter=1000).fit(X[train], y[train])
    return roc_auc_score(y[~train], clf.predict_proba(X[~train])[:, 1])


def _grouped_and_cell_auroc(cohort):
    """Mean AUROC over datasets: held-out patients (samples for one cell line) vs random cells."""
    grouped, cell = [], []
    for _, adata, _ in cohort:
        obs = adata.obs
        key = "patient_id" if obs["patient_id"].nunique() >= 4 else "sample_id"
        held_in = set()
        for label in ("sensitive", "resistant"):
            held_in |= set(sorted(obs.loc[obs["response"] == label, key].unique())[::2])
        train = obs[key].isin(held_in).to_numpy()
        X, y = _log_norm(adata), (obs["response"] == "resistant").to_numpy().astype(int)
        grouped.append(_auroc(X, y, train))
        cell.append(_auroc(X, y, np.random.default_rng(0).random(len(y)) < 0.5))
    return float(np.mean(grouped)), float(np.mean(cell))


_SIGNAL_KW = dict(n_datasets=4, cells_per_dataset=1200, samples_per_dataset=8, n_genes=500)


def test_response_signal_generalises_to_held_out_samples():
    grouped, cell = _grouped_and_cell_auroc(simulate_cohort(effect=1.0, **_SIGNAL_KW))
    assert grouped > 0.8 and cell > 0.95


def test_no_effect_means_chance_on_held_out_samples_but_not_on_cells():
    # Sample-level labels + batch effects: cell-level CV "learns" sample identity.
    grouped, cell = _grouped_and_cell_auroc(
        simulate_cohort(effect=0.0, batch_effect=0.3, **_SIGNAL_KW))
    assert abs(grouped - 0.5) < 0.15
    assert cell > 0.85


def test_batch_effect_makes_samples_identifiable():
    kw = dict(n_datasets=1, cells_per_dataset=600, samples_per_dataset=6, n_genes=300, effect=0.0)
    accuracy = {}
    for batch in (0.0, 0.5):
        (_, adata, _), = simulate_cohort(batch_effect=batch, **kw)
        obs = adata.obs[adata.obs["response"] == "sensitive"]  # same label, different samples
        X = _log_norm(adata)[np.flatnonzero(adata.obs["response"] == "sensitive")]
        y = obs["sample_id"].cat.remove_unused_categories().cat.codes.to_numpy()
        train = np.random.default_rng(0).random(len(y)) < 0.5
        clf = LogisticRegression(C=0.1, max_iter=1000).fit(X[train], y[train])
        accuracy[batch] = (clf.predict(X[~train]) == y[~train]).mean()
    chance = 1 / 3
    assert accuracy[0.5] > 0.9 and accuracy[0.5] > accuracy[0.0] + 0.2 > chance


# ------------------------------------------------------------------------------ paper collection


def test_paper_collection_scaled_down():
    gen = simulate_paper_collection(scale=0.01, n_genes=100, seed=1)
    assert isinstance(gen, types.GeneratorType)
    items = list(gen)
    assert [n for n, _, _ in items] == [r.name for r in PAPER_DATASETS]
    total = res_total = 0
    for (name, adata, meta), row in zip(items, PAPER_DATASETS):
        obs = adata.obs
        n_res = int((obs["response"] == "resistant").sum())
        assert meta["regimen"] == row.regimen and meta["tissue"] == row.tissue
        assert obs["sample_id"].nunique() == row.n_samples
        assert (obs.groupby("sample_id", observed=True)["response"].nunique() == 1).all()
        assert n_res > 0 and n_res < adata.n_obs
        if min(row.sensitive, row.resistant) >= 1000:  # big enough to round faithfully
            assert abs(n_res / adata.n_obs - row.resistant / row.cells) < 0.03, name
        total += adata.n_obs
        res_total += n_res
    assert abs(total - 3268) < 120  # small samples keep a few cells each
    assert abs(res_total / total - 163_794 / 326_751) < 0.02


def test_paper_collection_full_scale_is_exact():
    # Cell counts do not depend on the number of genes: 4 genes keep this fast.
    for (name, adata, _), row in zip(simulate_paper_collection(n_genes=4), PAPER_DATASETS):
        counts = adata.obs["response"].value_counts()
        assert (counts["sensitive"], counts["resistant"]) == (row.sensitive, row.resistant), name


def test_paper_collection_each_dataset_has_its_own_stream():
    first = next(simulate_paper_collection(scale=0.02, n_genes=50, seed=5))[1]
    again = next(simulate_paper_collection(scale=0.02, n_genes=50, seed=5))[1]
    assert (first.X != again.X).nnz == 0


# ------------------------------------------------------------------------------ writing


def test_write_cohort_round_trip(tmp_path):
    cohort = simulate_cohort(n_datasets=2, cells_per_dataset=60, n_genes=50, seed=2)
    paths = write_cohort(cohort, tmp_path / "out")
    assert [p.name for p in paths] == ["SimData1.h5ad", "SimData2.h5ad"]
    for path, (name, adata, meta) in zip(paths, cohort):
        back = ad.read_h5ad(path)
        assert (back.X != adata.X).nnz == 0 and back.X.dtype == np.int32
        assert list(back.obs["response"]) == list(adata.obs["response"])
        assert back.uns["dataset"]["regimen"] == meta["regimen"]


def test_write_cohort_accepts_the_lazy_collection(tmp_path):
    paths = write_cohort(simulate_paper_collection(scale=0.002, n_genes=20), tmp_path)
    assert len(paths) == 36 and all(p.exists() for p in paths)
