"""The answer cache: table ``zero_shot_cache`` in the store's index.

A request is identified by the sha256 of the model name and the exact messages JSON, so a
rerun (or a second run whose batches coincide) sends nothing it has already paid for. The
table is created on first write (``CREATE TABLE IF NOT EXISTS``: stores made before it
existed get it then), so a run that fails before any answer arrives leaves the store as it
was. Answers are written in small transactions as they arrive, not with the results, so an
interrupted run keeps them.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from ..store.schema import ZERO_SHOT_CACHE_DDL
from ..store.store import Store, now

TABLE = "zero_shot_cache"


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()


def lookup(store: Store, keys) -> dict[str, str]:
    """Cached answers of ``keys`` (those not cached are absent)."""
    keys = sorted(set(keys))
    if not keys:
        return {}
    with store.connect() as con:
        if not con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = ?", [TABLE]).fetchall():
            return {}
        con.register("wanted_keys", pd.DataFrame({"key": keys}))
        rows = con.execute(f"SELECT c.key, c.response FROM {TABLE} c JOIN wanted_keys USING (key)").fetchall()
        con.unregister("wanted_keys")
    return dict(rows)


def save(store: Store, entries: list[tuple[str, str, str, str]]) -> None:
    """Store ``(key, model, prompt, response)`` entries in one transaction."""
    if not entries:
        return
    stamp = now()
    with store.transaction() as con:
        con.execute(ZERO_SHOT_CACHE_DDL)
        con.executemany(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?)",
                        [[key, model, prompt, response, stamp] for key, model, prompt, response in entries])
