"""User SQL against the index: one read-only statement, on a connection that cannot reach files.

Three guards, each decided by DuckDB itself rather than by matching text:

* **What a statement is** comes from DuckDB's parser (``duckdb.extract_statements``): only a
  ``SELECT``, or an ``EXPLAIN`` of a ``SELECT``, passes. ``EXPLAIN ANALYZE`` runs its statement,
  so the statement after ``EXPLAIN [ANALYZE] [(options)]`` (found with DuckDB's tokenizer) is
  parsed and checked the same way.
* **A condition** (``--where``) is parsed as ``SELECT * FROM <table> WHERE <condition>`` and its
  syntax tree (``json_serialize_sql``) must be exactly that: one plain select from that table
  with a WHERE and nothing else. A condition cannot close a parenthesis, add a clause, or start
  another query, so it can be embedded in a larger statement.
* **Every read connection** is opened read-only with ``enable_external_access = false`` and
  ``lock_configuration = true`` (:data:`READ_CONFIG`): whatever a statement says, it cannot read
  or write a file other than the index (no ``read_csv``, ``COPY ... TO``, ``ATTACH``, ``glob``),
  load an extension, or change a setting. Reading the store's own tables stays allowed.
"""

from __future__ import annotations

import json

import duckdb

from ..errors import UserError
from .common import first_line

ALLOWED_STATEMENTS = {"SELECT", "EXPLAIN"}
READ_CONFIG = {"enable_external_access": False, "autoload_known_extensions": False,
               "autoinstall_known_extensions": False, "lock_configuration": True}


def _statements(query: str, what: str):
    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise UserError(f"SQL syntax error in {what}: {first_line(e)}") from None


def _explained(query: str, what: str) -> str:
    """The statement that ``EXPLAIN [ANALYZE] [(options)] <statement>`` explains."""
    tokens = duckdb.tokenize(query)
    starts = [pos for pos, _ in tokens] + [len(query)]

    def text(i):
        return query[starts[i]:starts[i + 1]].strip().upper()

    i = 1                                            # token 0 is EXPLAIN
    if i < len(tokens) and text(i) in ("ANALYZE", "ANALYSE"):
        i += 1
    if i < len(tokens) and text(i) == "(":           # EXPLAIN (FORMAT json) ...
        depth = 0
        while i < len(tokens):
            depth += {"(": 1, ")": -1}.get(text(i), 0)
            i += 1
            if depth == 0:
                break
    if i >= len(tokens):
        raise UserError(f"the {what} is an EXPLAIN without a statement: give EXPLAIN SELECT ...")
    return query[starts[i]:]


def statement_kind(query: str, what: str = "query") -> str:
    """'SELECT' or 'EXPLAIN' for one read-only statement; a :class:`UserError` for anything else."""
    statements = _statements(query, what)
    if not statements:
        raise UserError(f"the {what} is empty: give a SELECT statement")
    if len(statements) > 1:
        raise UserError(f"the {what} holds {len(statements)} statements: give exactly one SELECT")
    kind = statements[0].type.name
    if kind not in ALLOWED_STATEMENTS:
        raise UserError(f"the {what} is a {kind} statement: the store is read-only here, only SELECT is allowed")
    if kind == "EXPLAIN":
        inner = _statements(_explained(query, what), what)
        inner_kind = inner[0].type.name if len(inner) == 1 else "MULTI"
        if inner_kind != "SELECT":
            raise UserError(f"the {what} explains a {inner_kind} statement (EXPLAIN ANALYZE would run it): "
                            "only EXPLAIN of a SELECT is allowed")
    return kind


def check_select(query: str, what: str = "query") -> None:
    """Refuse anything but one read-only statement, before it reaches the database."""
    statement_kind(query, what)


def check_condition(condition: str, table: str, what: str = "--where") -> str:
    """``condition`` if it is one SQL condition on ``table``; a one-line :class:`UserError` otherwise.

    The returned text may be embedded as ``(\\n<condition>\\n)`` in a larger statement.
    """
    if not condition or not condition.strip():
        raise UserError(f"{what} is empty: give a condition such as \"dataset = 'pc9'\"")
    query = f"SELECT * FROM {table} WHERE {condition}"
    if len(_statements(query, f"{what} {condition!r}")) > 1:
        raise UserError(f"{what} {condition!r} holds more than one statement (a ';'): give only a condition")
    check_select(query, f"{what} condition")
    with duckdb.connect(config=READ_CONFIG) as con:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    if tree.get("error"):
        raise UserError(f"invalid {what} {condition!r}: {tree.get('error_message') or 'not a condition'}")
    statements = tree.get("statements") or []
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    source = node.get("from_table") or {}
    plain = (node.get("type") == "SELECT_NODE" and not node.get("modifiers")
             and not (node.get("cte_map") or {}).get("map") and not node.get("group_expressions")
             and not node.get("group_sets") and node.get("having") is None and node.get("qualify") is None
             and node.get("sample") is None and node.get("where_clause") is not None
             and source.get("type") == "BASE_TABLE" and source.get("table_name") == table
             and not source.get("schema_name") and not source.get("catalog_name")
             and len(node.get("select_list") or []) == 1 and node["select_list"][0].get("class") == "STAR")
    if not plain:
        raise UserError(f"{what} {condition!r} is not a single condition on {table} (it adds clauses or a query of "
                        "its own): give only what follows WHERE")
    return condition


def embed(condition: str) -> str:
    """A checked condition as a parenthesised term (newlines end any trailing ``--`` comment)."""
    return f"(\n{condition}\n)"
