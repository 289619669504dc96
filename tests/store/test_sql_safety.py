"""User SQL cannot write, cannot read files outside the store, cannot change settings, and a
--where condition cannot escape its parentheses: each attack is a one-line exit-2 error and
leaves the store (and the file system) exactly as it was."""

from __future__ import annotations

import pytest

from conftest import snapshot
from scdrugmap.errors import UserError
from scdrugmap.store.sql import check_condition, statement_kind
from scdrugmap.store.store import Store

SECRET = "the secret of this machine"


@pytest.fixture
def st(store_copy, tmp_path):
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    return store_copy()


QUERY_ATTACKS = [
    ("EXPLAIN ANALYZE COPY (SELECT 'x') TO '{st}/index.duckdb' (FORMAT csv)", "explains a COPY"),
    ("EXPLAIN COPY (SELECT 'x') TO '{tmp}/out.csv'", "explains a COPY"),
    ("EXPLAIN (FORMAT json) COPY (SELECT 1) TO '{tmp}/out.csv'", "explains a COPY"),
    ("COPY (SELECT 'x') TO '{tmp}/out.csv' (FORMAT csv)", "COPY statement"),
    ("SELECT * FROM read_csv('{tmp}/secret.txt', header=false)", "disabled by configuration"),
    ("SELECT * FROM read_text('{tmp}/*')", "disabled by configuration"),
    ("SELECT content FROM read_blob('{tmp}/secret.txt')", "disabled by configuration"),
    ("SELECT * FROM glob('{tmp}/*')", "disabled by configuration"),
    ("SELECT * FROM '{tmp}/secret.txt'", "SQL error"),
    ("SELECT * FROM query('SELECT * FROM read_text(''{tmp}/secret.txt'')')", "disabled by configuration"),
    ("WITH x AS (SELECT * FROM read_text('{tmp}/secret.txt')) SELECT * FROM x", "disabled by configuration"),
    ("ATTACH '{tmp}/other.duckdb' AS o", "ATTACH statement"),
    ("SET enable_external_access = true", "SET statement"),
    ("INSTALL httpfs", "statement"),
    ("LOAD httpfs", "statement"),
    ("DELETE FROM cells", "DELETE statement"),
    ("SELECT 1; DELETE FROM cells", "2 statements"),
    ("CHECKPOINT", "statement"),
    ("PRAGMA enable_external_access", "statement"),
]


@pytest.mark.parametrize("sql, match", QUERY_ATTACKS)
def test_query_attacks_are_refused_and_change_nothing(cli, st, tmp_path, sql, match):
    before, files = snapshot(st), sorted(p.name for p in tmp_path.iterdir())
    err = cli.fails("query", "--store", st, sql.format(st=st, tmp=tmp_path), match=match)
    assert SECRET not in err
    assert snapshot(st) == before and sorted(p.name for p in tmp_path.iterdir()) == files
    assert len(Store.open(st).cells()) == 800


@pytest.mark.parametrize("where", [
    "obs_name IN (SELECT content FROM read_text('{tmp}/secret.txt'))",
    "length((SELECT string_agg(content, '') FROM read_text('{tmp}/*'))) > 0",
    "dataset IN (SELECT column0 FROM read_csv('{tmp}/secret.txt', header=false))",
])
def test_probe_where_cannot_read_files(cli, st, tmp_path, where):
    before = snapshot(st)
    err = cli.fails("probe", "--store", st, "--backbone", "pca", "--where", where.format(tmp=tmp_path), "--quiet",
                    match="disabled by configuration")
    assert SECRET not in err and snapshot(st) == before


def test_leaderboard_where_cannot_read_files(cli, st, tmp_path):
    cli.fails("leaderboard", "--store", st, "--where", f"head IN (SELECT content FROM read_text('{tmp_path}/*'))",
              match="disabled by configuration")


@pytest.mark.parametrize("where, match", [
    ("1=1) OR (1=1", "syntax error"),
    ("dataset = 'SimData1') OR (1=1", "syntax error"),
    ("dataset = 'SimData1' ORDER BY row", "not a single condition"),
    ("dataset = 'SimData1' LIMIT 3", "not a single condition"),
    ("dataset = 'SimData1' UNION ALL SELECT * FROM cohort", "not a single condition"),
    ("1=1 GROUP BY dataset", "not a single condition"),
    ("1=1; DROP TABLE cells", "more than one statement"),
    ("1=1 /* an open comment", "syntax error"),
    ("   ", "empty"),
])
def test_where_cannot_escape_its_parentheses(cli, st, where, match):
    before = snapshot(st)
    cli.fails("probe", "--store", st, "--backbone", "pca", "--where", where, "--quiet", match=match)
    assert snapshot(st) == before


def test_where_selects_exactly_what_it_says(st):
    store = Store.open(st)
    # a trailing comment ends at the newline the condition is wrapped in: the dataset filter still applies
    cells = store.cells("label = 'sensitive' -- a comment", datasets=["SimData1"])
    assert set(cells["dataset"]) == {"SimData1"} and set(cells["label"]) == {"sensitive"}
    assert len(store.cells("dataset IN (SELECT dataset FROM datasets WHERE n_cells > 0)")) == 800


def test_reading_the_stores_own_tables_stays_allowed(cli, st):
    out = cli.ok("query", "--store", st, "SELECT count(*) AS n FROM cells JOIN datasets USING (dataset)").output
    assert "800" in out
    cli.ok("query", "--store", st, "EXPLAIN SELECT * FROM cohort")
    cli.ok("query", "--store", st, "EXPLAIN ANALYZE SELECT count(*) FROM cohort")
    cli.ok("query", "--store", st, "DESCRIBE cells")
    assert "pca" in cli.ok("query", "--store", st, "FROM provenance").output


def test_statement_kinds_come_from_the_parser():
    assert statement_kind("  select 1  ") == "SELECT"
    assert statement_kind("explain analyse select 1") == "EXPLAIN"
    assert statement_kind("EXPLAIN (FORMAT json) SELECT 1") == "EXPLAIN"
    # a keyword inside a string is not a statement
    assert statement_kind("SELECT 'COPY x TO y; DELETE FROM cells'") == "SELECT"
    for sql in ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "EXPLAIN ANALYZE INSERT INTO cells SELECT * FROM cells",
                "EXPLAIN UPDATE cells SET label = 'x'"):
        with pytest.raises(UserError, match="only EXPLAIN of a SELECT"):
            statement_kind(sql)
    assert check_condition("label = ')' AND dataset <> '('", "cohort") == "label = ')' AND dataset <> '('"
