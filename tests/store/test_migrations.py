"""Schema versions: a version-1 store (built here by hand) is migrated on open; a newer one is refused."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import zarr

from conftest import snapshot
from scdrugmap.errors import UserError
from scdrugmap.store import migrations
from scdrugmap.store.schema import SCHEMA_VERSION
from scdrugmap.store.store import Store

# The index as scdrugmap 0.1.0 wrote it (schema version 1): no provenance.origin, and no
# zero_shot_cache (created lazily by the first zero-shot run in version 1).
V1_DDL = [
    "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE datasets (dataset VARCHAR PRIMARY KEY, n_cells INTEGER NOT NULL, n_genes INTEGER NOT NULL,
        n_sensitive INTEGER NOT NULL, n_resistant INTEGER NOT NULL, source_path VARCHAR NOT NULL,
        source_sha256 VARCHAR NOT NULL, source_layer VARCHAR, value_kind VARCHAR NOT NULL,
        gene_id_type VARCHAR NOT NULL, symbol_col VARCHAR, ensembl_col VARCHAR, label_col VARCHAR NOT NULL,
        label_map VARCHAR NOT NULL, sample_col VARCHAR, patient_col VARCHAR, drug VARCHAR, cancer_type VARCHAR,
        tissue VARCHAR, therapy VARCHAR, regimen VARCHAR, scdrugmap_version VARCHAR NOT NULL,
        ingested_at TIMESTAMP NOT NULL)""",
    """CREATE TABLE cells (dataset VARCHAR NOT NULL, "row" INTEGER NOT NULL, obs_name VARCHAR NOT NULL,
        label VARCHAR NOT NULL, label_raw VARCHAR NOT NULL, sample VARCHAR, patient VARCHAR,
        PRIMARY KEY (dataset, "row"))""",
    """CREATE TABLE provenance (backbone VARCHAR NOT NULL, dataset VARCHAR NOT NULL, array_path VARCHAR NOT NULL,
        n_cells INTEGER NOT NULL, dim INTEGER NOT NULL, dtype VARCHAR NOT NULL, chunk_rows INTEGER NOT NULL,
        scdrugmap_version VARCHAR NOT NULL, checkpoint_sha256 VARCHAR, source_sha256 VARCHAR NOT NULL,
        params VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL, PRIMARY KEY (backbone, dataset))""",
    """CREATE TABLE probe_runs (run_id VARCHAR PRIMARY KEY, created_at TIMESTAMP NOT NULL,
        backbone VARCHAR NOT NULL, head VARCHAR NOT NULL, method VARCHAR NOT NULL, protocol VARCHAR NOT NULL,
        group_by VARCHAR NOT NULL, where_sql VARCHAR, seed INTEGER NOT NULL, positive_label VARCHAR NOT NULL,
        datasets VARCHAR[] NOT NULL, n_cells INTEGER NOT NULL, params VARCHAR NOT NULL, note VARCHAR,
        scdrugmap_version VARCHAR NOT NULL)""",
    """CREATE TABLE probe_results (run_id VARCHAR NOT NULL, split VARCHAR NOT NULL, status VARCHAR NOT NULL,
        reason VARCHAR, n_train INTEGER, n_test INTEGER, n_test_positive INTEGER, f1 DOUBLE, macro_f1 DOUBLE,
        auroc DOUBLE, auprc DOUBLE, accuracy DOUBLE, balanced_accuracy DOUBLE, mcc DOUBLE, "precision" DOUBLE,
        recall DOUBLE, fit_seconds DOUBLE, PRIMARY KEY (run_id, split))""",
    """CREATE OR REPLACE VIEW cohort AS SELECT c.*, d.drug, d.cancer_type, d.tissue, d.therapy, d.regimen
        FROM cells c JOIN datasets d USING (dataset)""",
]


@pytest.fixture
def v1_store(tmp_path):
    """A version-1 store written by hand: one dataset of 6 cells with a 4-d 'ext' embedding."""
    st = tmp_path / "v1"
    (st / "embeddings.zarr").mkdir(parents=True)
    X = np.arange(24, dtype=np.float32).reshape(6, 4)
    arr = zarr.create_array(store=str(st / "embeddings.zarr" / "ext" / "d1" / "a1"), shape=X.shape,
                            chunks=(4, 4), dtype="float32", zarr_format=3)
    arr[:] = X
    with duckdb.connect(str(st / "index.duckdb")) as con:
        for ddl in V1_DDL:
            con.execute(ddl)
        con.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('created_by', 'scdrugmap 0.1.0'), "
                    "('created_at', '2025-01-01T00:00:00')")
        con.execute("INSERT INTO datasets VALUES ('d1', 6, 10, 3, 3, '/data/d1.h5ad', 'abc', NULL, 'counts', "
                    "'symbol', NULL, NULL, 'response', '{}', NULL, NULL, 'erlotinib', 'Lung cancer', NULL, NULL, "
                    "NULL, '0.1.0', '2025-01-01 00:00:00')")
        for i in range(6):
            con.execute("INSERT INTO cells VALUES ('d1', ?, ?, ?, ?, NULL, NULL)",
                        [i, f"c{i}", ["sensitive", "resistant"][i % 2], ["s", "r"][i % 2]])
        con.execute("INSERT INTO provenance VALUES ('ext', 'd1', 'ext/d1/a1', 6, 4, 'float32', 4, '0.1.0', NULL, "
                    "'abc', '{}', '2025-01-01 00:00:00')")
    return st


def _schema(index_path) -> list:
    with duckdb.connect(str(index_path), read_only=True) as con:
        return con.execute("""SELECT table_name, column_name, data_type, is_nullable, column_default
                              FROM duckdb_columns() WHERE NOT internal ORDER BY table_name, column_index""").fetchall()


def test_version_1_store_is_migrated_on_open(v1_store, tmp_path):
    s = Store.open(v1_store)
    assert [m.from_version for m in s.migrated] == list(range(1, SCHEMA_VERSION))
    meta = dict(s.sql("SELECT key, value FROM meta").itertuples(index=False))
    assert meta["schema_version"] == str(SCHEMA_VERSION) and "migrated_from_1" in meta
    assert s.sql("SELECT origin FROM provenance")["origin"].tolist() == ["extracted"]
    assert s.sql("SELECT count(*) n FROM zero_shot_cache")["n"][0] == 0
    X, cells = s.load("ext")
    np.testing.assert_array_equal(X, np.arange(24, dtype=np.float32).reshape(6, 4))
    # the migrated index has exactly the tables and columns of a store created by this version
    fresh = Store.create(tmp_path / "fresh")
    assert _schema(v1_store / "index.duckdb") == _schema(fresh.index_path)
    assert Store.open(v1_store).migrated == []            # once only


def test_cli_migrates_and_says_so(cli, v1_store):
    out = cli.ok("store", "migrate", v1_store).output
    assert f"migrated {v1_store} to schema version {SCHEMA_VERSION}" in out and "origin" in out
    assert "nothing to do" in cli.ok("store", "migrate", v1_store).output
    assert "d1" in cli.ok("query", "--store", v1_store, "SELECT dataset FROM provenance").output


def test_newer_store_is_refused_naming_both_versions(cli, v1_store):
    with duckdb.connect(str(v1_store / "index.duckdb")) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    before = snapshot(v1_store)
    err = cli.fails("query", "--store", v1_store, "SELECT 1", match="newer")
    assert f"schema version {SCHEMA_VERSION + 1}" in err and f"version {SCHEMA_VERSION} that this scdrugmap" in err
    assert "upgrade scdrugmap" in err
    cli.fails("store", "info", v1_store, match="newer")
    assert snapshot(v1_store) == before


def test_failed_migration_leaves_the_index_as_it_was(v1_store, monkeypatch):
    def broken(con):
        migrations._v1_to_v2(con)
        raise RuntimeError("disk full")

    monkeypatch.setitem(migrations.MIGRATIONS, 1, migrations.Migration(1, "broken", broken))
    before = _schema(v1_store / "index.duckdb")
    with pytest.raises(RuntimeError, match="disk full"):
        Store.open(v1_store)
    assert _schema(v1_store / "index.duckdb") == before
    with duckdb.connect(str(v1_store / "index.duckdb"), read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"


def test_unwritable_old_store_says_how_to_migrate(v1_store, monkeypatch):
    real = duckdb.connect

    def read_only_fs(database=":memory:", read_only=False, **kw):
        if not read_only and database != ":memory:":
            raise duckdb.IOException("Cannot open file: Read-only file system")
        return real(database, read_only=read_only, **kw)

    monkeypatch.setattr(duckdb, "connect", read_only_fs)
    with pytest.raises(UserError, match="scdrugmap store migrate") as e:
        Store.open(v1_store)
    assert "schema version 1" in str(e.value) and f"version {SCHEMA_VERSION}" in str(e.value)


def test_every_version_below_the_current_one_has_a_migration():
    assert sorted(migrations.MIGRATIONS) == list(range(1, SCHEMA_VERSION))
    with pytest.raises(UserError, match="cannot migrate"):
        migrations.check_version(0, "store x")


def test_provenance_params_json_of_v1_rows_survives(v1_store):
    row = Store.open(v1_store).provenance("ext").iloc[0]
    assert json.loads(row["params"]) == {} and row["origin"] == "extracted"
