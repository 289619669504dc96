"""NCBI Gene (Entrez) IDs as gene identifiers: detected at ingest, mapped to HGNC symbols and
Ensembl IDs through the shipped table, refused when they are not human Entrez IDs."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import ROOT, snapshot
from scdrugmap.extract.panel import load_panel
from scdrugmap.extract.runner import _sources
from scdrugmap.store import gene_ids
from scdrugmap.store.store import Store

sys.path.insert(0, str(ROOT / "tests" / "extract"))
from checkpoints import write_pc9_every  # noqa: E402


def by_symbol() -> dict:
    return {s: e for e, s in gene_ids.load_table().symbols.items()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Real PC9 cells written twice with the same matrix: genes as HGNC symbols, and as their
    Entrez IDs (the PC9 genes whose symbol is an approved HGNC symbol)."""
    folder = tmp_path_factory.mktemp("entrez")
    _, cells = write_pc9_every(folder, step=48)
    table = by_symbol()
    keep = [i for i, s in enumerate(cells.var_names) if s in table]
    sym = cells[:, keep].copy()
    sym.write_h5ad(folder / "sym.h5ad")
    eg = sym.copy()
    eg.var_names = [str(table[s]) for s in sym.var_names]
    eg.write_h5ad(folder / "eg.h5ad")
    return folder / "sym.h5ad", folder / "eg.h5ad", sym


def _tiny(path, genes, n=10):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (n, len(genes))).astype(np.float32) + 1)
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * (n // 2)}, index=[f"c{i}" for i in range(n)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[str(g) for g in genes])).write_h5ad(path)
    return path


def test_table_is_the_recorded_hgnc_build():
    t = gene_ids.load_table()
    assert len(t) == int(t.meta["genes"]) == 43765
    assert t.meta["licence"].startswith("CC0") and t.meta["hgnc_date"].startswith("2024-07-23")
    assert t.meta["source_sha256"] == "a86c0a210385c95ba3251b0202250f4af0f1dd3e8369313ce49f9df92da6ea46"
    assert len(set(t.symbols.values())) == len(t)                     # one Entrez ID per symbol
    # well-known genes, and the L1000 panel's own Entrez IDs: every one is in the table
    assert (t.symbols[1956], t.ensembl[1956]) == ("EGFR", "ENSG00000146648")
    assert (t.symbols[7157], t.ensembl[7157]) == ("TP53", "ENSG00000141510")
    panel = load_panel()
    assert len(panel.entrez) == 978 and all(e in t.symbols for e in panel.entrez)
    # the symbols it gives the panel's IDs are the panel's, except genes HGNC renamed since
    renamed = {t.symbols[e] for e, i in panel.entrez.items() if t.symbols[e] != panel.symbols[i]}
    assert len(renamed) == 25 and {"AARS1", "EPRS1", "ELP1"} <= renamed


def test_as_entrez():
    assert gene_ids.as_entrez(["1", "1956", "7157"]).tolist() == [1, 1956, 7157]
    assert gene_ids.as_entrez(np.array([1, 1956])).tolist() == [1, 1956]
    for names in (["1", "0"], ["1", "-5"], ["1956", "EGFR"], ["1.0"], ["1e3"], ["٣"], [], [True]):
        assert gene_ids.as_entrez(names) is None, names


def test_entrez_dataset_gives_backbones_the_same_genes(cli, pair, tmp_path):
    sym_file, eg_file, sym = pair
    st = tmp_path / "st"
    cli.ok("ingest", sym_file, "--store", st, "--dataset", "sym", "--label-col", "response", "--quiet")
    out = cli.ok("ingest", eg_file, "--store", st, "--dataset", "eg", "--label-col", "response")
    assert f"{sym.n_vars:,} genes (entrez)" in out.output and "warning" not in out.output   # every ID maps
    s = Store.open(st)
    types = s.datasets().set_index("dataset")["gene_id_type"].to_dict()
    assert types == {"eg": "entrez", "sym": "symbol"}

    # the sources hand backbones the same symbols, and the table's Ensembl IDs
    eg, symsrc = _sources(s, ["eg", "sym"])
    np.testing.assert_array_equal(eg.symbols(upper=False), symsrc.symbols(upper=False))
    np.testing.assert_array_equal(eg.symbols(), symsrc.symbols())
    ens = eg.ensembl_ids()
    assert ens[list(sym.var_names).index("EGFR")] == "ENSG00000146648"
    assert (ens != "").mean() > 0.9 and symsrc.ensembl_ids() is None
    assert eg.entrez_ids()[list(sym.var_names).index("EGFR")] == 1956 and symsrc.entrez_ids() is None

    # hvg: the same panel genes and the same values
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--quiet")
    X, cells = s.load("hvg", dtype=np.float32)
    a, b = X[(cells["dataset"] == "eg").to_numpy()], X[(cells["dataset"] == "sym").to_numpy()]
    prov = s.provenance("hvg").set_index("dataset")
    found = {d: json.loads(prov.loc[d, "params"])["panel_genes_found"] for d in ("eg", "sym")}
    panel = load_panel()
    by_sym = set(sym.var_names.str.upper())
    sym_cols = [i for i, g in enumerate(panel.symbols) if g in by_sym or
                any(panel.aliases.get(v) == i for v in by_sym)]
    assert found["sym"] == found["eg"] == len(sym_cols) > 800
    assert len(a) == len(b) == sym.n_obs and np.abs(a).sum() > 0
    np.testing.assert_array_equal(a, b)
    # pca over both datasets runs on the same features
    cli.ok("extract", "--store", st, "--backbone", "pca", "--option", "n_components=5", "--quiet")
    P, _ = Store.open(st).load("pca", dtype=np.float32)
    assert P.shape == (2 * sym.n_obs, 5) and np.isfinite(P).all()


def test_panel_matches_entrez_ids_of_renamed_genes():
    """HGNC renamed 25 L1000 genes after the panel was made (AARS -> AARS1, ...): a dataset with
    Entrez IDs matches them on the ID; the same genes under their new symbols alone do not."""
    from scdrugmap.extract.panel import panel_columns

    panel = load_panel()
    ids = np.array([16, 1956, 999999999])                          # AARS1, EGFR, unknown
    symbols = gene_ids.entrez_symbols(ids)
    assert symbols.tolist() == ["AARS1", "EGFR", "999999999"]
    cols, dst = panel_columns(panel, symbols, ids)
    assert cols.tolist() == [0, 1] and [panel.symbols[i] for i in dst] == ["AARS", "EGFR"]
    cols, dst = panel_columns(panel, symbols)
    assert [panel.symbols[i] for i in dst] == ["EGFR"]


def test_entrez_dataset_in_a_symbol_vocabulary_backbone(cli, pair, tmp_path):
    """scGPT tokenises the Entrez dataset exactly as the same cells with symbols."""
    pytest.importorskip("torch")
    from official_scgpt import save_official_scgpt
    from scdrugmap.extract.backbones.scgpt import ScGPT

    sym_file, eg_file, sym = pair
    model = ScGPT(model_dir=save_official_scgpt(tmp_path / "scgpt", embsize=64, nlayers=2, nheads=4, d_hid=96))
    st = tmp_path / "st"
    cli.ok("ingest", sym_file, "--store", st, "--dataset", "sym", "--label-col", "response", "--quiet")
    cli.ok("ingest", eg_file, "--store", st, "--dataset", "eg", "--label-col", "response", "--quiet")
    eg, symsrc = _sources(Store.open(st), ["eg", "sym"])
    cols_eg, ids_eg, n_eg = model.matching(eg)
    cols_sym, ids_sym, n_sym = model.matching(symsrc)
    assert n_eg == n_sym == sym.n_vars and len(cols_eg) > 0.9 * n_eg
    np.testing.assert_array_equal(cols_eg, cols_sym)
    np.testing.assert_array_equal(ids_eg, ids_sym)
    # the same cells embed to the same vectors (the tokeniser's per-cell seed also uses the name)
    eg.name = symsrc.name = "pc9"
    block = sp.csr_matrix(sym.X[:6])
    np.testing.assert_array_equal(model.embed_block(block, model.cell_tokenizer(eg)),
                                  model.embed_block(block, model.cell_tokenizer(symsrc)))


def test_entrez_dataset_in_an_ensembl_backbone(cli, pair, tmp_path):
    """Geneformer takes the table's Ensembl IDs; the symbols go through the release's name
    dictionary. Both find most of the genes, mostly the same ones."""
    pytest.importorskip("torch")
    from checkpoints import save_geneformer
    from scdrugmap.extract.backbones.geneformer import Geneformer

    sym_file, eg_file, sym = pair
    model = Geneformer(model_dir=save_geneformer(tmp_path / "gf", num_hidden_layers=2, hidden_size=32,
                                                 intermediate_size=64, num_attention_heads=2,
                                                 max_position_embeddings=64))
    st = tmp_path / "st"
    cli.ok("ingest", sym_file, "--store", st, "--dataset", "sym", "--label-col", "response", "--quiet")
    cli.ok("ingest", eg_file, "--store", st, "--dataset", "eg", "--label-col", "response", "--quiet")
    eg, symsrc = _sources(Store.open(st), ["eg", "sym"])
    ids_eg, ids_sym = model.gene_ids(eg), model.gene_ids(symsrc)
    vocab = set(model.tokens) & set(model.medians)
    in_eg = {i for i, g in enumerate(ids_eg) if g in vocab}
    in_sym = {i for i, g in enumerate(ids_sym) if g in vocab}
    # measured on these PC9 genes: 13,091 by Entrez ID, 13,106 by symbol, 13,066 by both
    assert min(len(in_eg), len(in_sym)) > 0.75 * sym.n_vars
    assert len(in_eg & in_sym) > 0.99 * min(len(in_eg), len(in_sym))
    assert ids_eg[list(sym.var_names).index("EGFR")] == "ENSG00000146648"
    # and the tokeniser runs on them: every cell gets tokens
    tok = model.cell_tokenizer(eg)
    prepared = tok.prepare(sp.csr_matrix(sym.X[:4]))
    assert all(len(tok.tokens(prepared, i)) > 10 for i in range(4))


def _store_with_one_dataset(cli, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", _tiny(tmp_path / "first.h5ad", ["EGFR", "TP53", "KRAS", "MYC"]), "--store", st,
           "--dataset", "first", "--label-col", "response", "--quiet")
    return st


@pytest.mark.parametrize("case, genes, match", [
    # integers, but no human Entrez IDs (past the largest NCBI Gene ID)
    ("not_entrez", [str(900_000_000 + 7 * i) for i in range(40)],
     "only 0 of 40 are NCBI Gene (Entrez) IDs of human genes in the HGNC table"),
    # a few real IDs among many unknown ones: too few to be an Entrez-ID file
    ("too_few", ["1956", "7157", "3845"] + [str(900_000_000 + i) for i in range(37)], "only 3 of 40"),
    # 1..n: row numbers written as var_names
    ("row_numbers", [str(i) for i in range(1, 41)], "are the numbers 1..40, row numbers rather than gene IDs"),
    # 0..n-1 (anndata's default names) are not positive, so not Entrez IDs either
    ("zero_based", [str(i) for i in range(40)], "neither gene symbols nor Ensembl IDs nor NCBI Gene (Entrez) IDs"),
])
def test_integers_that_are_not_entrez_ids_are_refused(cli, tmp_path, case, genes, match):
    st = _store_with_one_dataset(cli, tmp_path)
    before = snapshot(st)
    path = _tiny(tmp_path / f"{case}.h5ad", genes)
    err = cli.fails("ingest", path, "--store", st, "--dataset", case, "--label-col", "response", match=match)
    assert "set var_names to" in err
    assert snapshot(st) == before
    assert Store.open(st).dataset_names() == ["first"]
    # and a first ingest leaves no store behind
    cli.fails("ingest", path, "--store", tmp_path / "new", "--dataset", case, "--label-col", "response", match=match)
    assert not (tmp_path / "new").exists()


def test_partly_mapped_entrez_ids_are_reported_and_unknown_ones_left_out(cli, tmp_path):
    """Most IDs known: ingest says how many map; the unknown ones keep their number as symbol
    (no vocabulary or panel has it) and get no Ensembl ID."""
    known = [1956, 7157, 3845, 4609, 16, 2, 9, 10]               # EGFR TP53 KRAS MYC AARS1 A2M NAT1 NAT2
    unknown = [900_000_001, 900_000_002]
    st = tmp_path / "st"
    out = cli.ok("ingest", _tiny(tmp_path / "p.h5ad", known + unknown), "--store", st, "--dataset", "p",
                 "--label-col", "response")
    assert "10 genes (entrez)" in out.output
    assert "warning: 8 of 10 Entrez IDs map to HGNC symbols (2024-07-23 table); the other 2" in out.stderr
    (source,) = _sources(Store.open(st), ["p"])
    assert source.symbols(upper=False).tolist() == ["EGFR", "TP53", "KRAS", "MYC", "AARS1", "A2M", "NAT1", "NAT2",
                                                    "900000001", "900000002"]
    ens = source.ensembl_ids()
    assert ens[0] == "ENSG00000146648" and ens[-2:].tolist() == ["", ""]
    # hvg: the 5 known panel genes, by ID (AARS1 is the panel's AARS); the unknown IDs match nothing
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--quiet")
    prov = Store.open(st).provenance("hvg").iloc[0]
    assert json.loads(prov["params"])["panel_genes_found"] == len({"EGFR", "TP53", "KRAS", "MYC", "AARS"}
                                                                  & set(load_panel().symbols))


def test_table_build_script_is_reproducible(tmp_path):
    """scripts/make_hgnc_table.py on a table in HGNC's complete-set layout: approved genes with
    an Entrez ID only, sorted by ID, source sha256 recorded, the same bytes on every run."""
    src = tmp_path / "hgnc_complete_set.txt"
    src.write_text("hgnc_id\tsymbol\tname\tstatus\tentrez_id\tensembl_gene_id\n"
                   "HGNC:3236\tEGFR\tepidermal growth factor receptor\tApproved\t1956\tENSG00000146648\n"
                   "HGNC:5\tA1BG\talpha-1-B glycoprotein\tApproved\t1\tENSG00000121410\n"
                   "HGNC:99\tOLD1\twithdrawn\tEntry Withdrawn\t99999\t\n"
                   "HGNC:100\tNOID\tno entrez\tApproved\t\tENSG00000000001\n"
                   "HGNC:101\tNOENS\tno ensembl\tApproved\t777\t\n")
    outs = []
    for k in range(2):
        out = tmp_path / f"t{k}.tsv.gz"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_hgnc_table.py"), str(src), "--out", str(out),
                        "--date", "2099-01-01"], check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    lines = gzip.decompress(outs[0]).decode().splitlines()
    assert f"# source_sha256: {hashlib.sha256(src.read_bytes()).hexdigest()}" in lines
    assert "# hgnc_date: 2099-01-01" in lines and any(line.startswith("# licence: CC0") for line in lines)
    body = [line for line in lines if not line.startswith("#")]
    assert body == ["entrez_id\tsymbol\tensembl_gene_id", "1\tA1BG\tENSG00000121410", "777\tNOENS\t",
                    "1956\tEGFR\tENSG00000146648"]


def test_zscored_entrez_matrix_as_a_lab_sends_it(cli, pair, tmp_path):
    """What SCAD-style target sets look like: z-scored expression, Entrez IDs, response 1/0.
    It goes in with --values scaled; hvg/pca read it; a count backbone refuses it in one line."""
    from conftest import snapshot as snap

    _, eg_file, sym = pair
    eg = ad.read_h5ad(eg_file)
    X = np.log1p(eg.X.toarray() / np.maximum(eg.X.sum(axis=1), 1) * 1e4)
    sd = X.std(axis=0)
    eg.X = ((X - X.mean(axis=0)) / np.where(sd > 0, sd, 1)).astype(np.float32)
    eg.obs["response"] = (eg.obs["response"] != "resistant").astype(int)
    eg.write_h5ad(tmp_path / "z.h5ad")
    st = tmp_path / "st"
    labels = ["--label-col", "response", "--sensitive", "1", "--resistant", "0"]   # SCAD: 1 = responder
    cli.fails("ingest", tmp_path / "z.h5ad", "--store", st, "--dataset", "z", *labels, match="--values scaled")
    assert not st.exists()
    out = cli.ok("ingest", tmp_path / "z.h5ad", "--store", st, "--dataset", "z", *labels, "--values", "scaled").output
    assert "(entrez)" in out
    row = Store.open(st).datasets().iloc[0]
    assert (row["value_kind"], row["gene_id_type"]) == ("scaled", "entrez")
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--quiet")
    Xh, _ = Store.open(st).load("hvg", dtype=np.float32)
    assert Xh.shape[0] == sym.n_obs and (Xh < 0).any()               # the z-scores, as given
    before = snap(st)
    cli.fails("extract", "--store", st, "--backbone", "scgpt", "--model-dir", tmp_path, match="needs raw counts")
    assert snap(st) == before
