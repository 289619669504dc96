"""User mistakes end in one line, 'Error: <problem>: <fix>', exit code 2, and an untouched store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, snapshot
from scdrugmap.demo import MARKER, _prepare_out
from scdrugmap.errors import UserError
from scdrugmap.probe.run import run_probe
from scdrugmap.store.store import Store


@pytest.mark.parametrize("args, match", [
    (["probe", "--store", "{st}", "--backbone", "pca", "--seed", "-1"], "--seed"),
    (["probe", "--store", "{st}", "--backbone", "pca", "--seed", str(2**40)], "--seed"),
    (["extract", "--store", "{st}", "--backbone", "pca", "--option", "n_components=0", "--force"],
     "n_components=0: must be at least 1"),
    (["extract", "--store", "{st}", "--backbone", "hvg", "--batch-size", "-5"], "--batch-size -5 is out of range"),
    (["extract", "--store", "{st}", "--backbone", "hvg", "--batch-size", str(10**15)], "is out of range"),
    (["extract", "--store", "{st}", "--backbone", "hvg", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["extract", "--store", "{st}", "--backbone", "hvg", "--chunk-rows", "0"], "--chunk-rows"),
    (["export", "--store", "{st}", "--backbone", "pca", "--to", "/proc/x.h5ad"], "cannot write the export"),
    (["export", "--store", "{st}", "--backbone", "pca", "--to", "/sys/x.parquet"], "cannot write the export"),
    (["export", "--store", "{st}", "--backbone", "pca", "--to", "/proc/nope/x.parquet"], "does not exist"),
    (["store", "pack", "{st}", "/proc/p.tar"], "cannot write the pack"),
    (["store", "pack", "{st}", "/proc/deeper/p.tar"], "cannot write the pack"),
    (["store", "unpack", "{tmp}/p.tar", "/sys/unpacked"], "cannot write the unpacked store"),
    (["probe", "--store", "{st}", "--backbone", "pca", "--where", "1=1) OR (1=1"], "syntax error"),
    (["probe", "--store", "{st}"], "Missing option '--backbone'"),
    (["probe", "--store", "{st}", "--backbone", "pca", "--head"], "requires an argument"),
    (["probe", "--store", "{st}", "--backbone", "pca", "--protocol", "nope"], "Invalid value for '--protocol'"),
    (["no-such-command"], "No such command"),
    (["store", "nope"], "No such command"),
])
def test_one_line_exit_2_store_unchanged(cli, store_copy, tmp_path, args, match):
    st = store_copy()
    from scdrugmap.store.pack import pack

    pack(st, tmp_path / "p.tar")
    before, files = snapshot(st), sorted(p.name for p in tmp_path.iterdir())
    err = cli.fails(*[a.format(st=st, tmp=tmp_path) for a in args], match=match)
    assert snapshot(st) == before and sorted(p.name for p in tmp_path.iterdir()) == files, err


def test_usage_errors_name_the_help(cli, small_store):
    err = cli.fails("probe", "--store", small_store, "--backbone", "pca", "--seed", "-1", match="--seed")
    assert "see 'scdrugmap probe --help'" in err and "0<=x<=4294967295" in err


def test_seed_out_of_range_in_the_api(small_store):
    before = snapshot(small_store)
    for seed in (-1, 2**40, 1.5):
        with pytest.raises(UserError, match="seed"):
            run_probe(Store.open(small_store), "pca", seed=seed, show_progress=False)
    assert snapshot(small_store) == before


def test_duplicate_cell_names_print_one_line_and_no_warning(tmp_path):
    """In a real process: anndata's own warning used to come before scdrugmap's error."""
    import anndata as ad
    import numpy as np

    a = ad.AnnData(X=np.ones((4, 3), dtype=np.float32), obs={"response": ["sensitive", "resistant"] * 2})
    a.var_names = ["EGFR", "KRAS", "TP53"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.obs_names = ["c0", "c0", "c1", "c2"]
        a.write_h5ad(tmp_path / "dup.h5ad")
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-m", "scdrugmap.cli", "ingest", str(tmp_path / "dup.h5ad"), "--store",
                        str(tmp_path / "st"), "--dataset", "d", "--label-col", "response"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    assert "not unique" in r.stderr and not (tmp_path / "st").exists()


def test_demo_refuses_a_folder_it_did_not_make(cli, tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    before = snapshot(mine)
    cli.fails("demo", "--out", mine, match="not an earlier demo's output")
    assert snapshot(mine) == before
    (mine / MARKER).write_text("")                       # a marker alone does not make other files the demo's
    cli.fails("demo", "--out", mine, match="not an earlier demo's output")
    assert (mine / "thesis.tex").read_text() == "months of work"
    (tmp_path / "file").write_text("x")
    cli.fails("demo", "--out", tmp_path / "file", match="is a file")


def test_demo_replaces_its_own_output(tmp_path):
    out = tmp_path / "demo-out"
    _prepare_out(out)                                    # new: made, marked
    (out / "data").mkdir()
    (out / "data" / "x.h5ad").write_text("old")
    (out / "store").mkdir()
    _prepare_out(out)                                    # an earlier demo's output: emptied, marked again
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    _prepare_out(empty)
    assert (empty / MARKER).is_file()
