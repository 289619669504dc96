"""Schema migrations of the index: one step per version, applied when a store is opened.

``MIGRATIONS[v]`` takes an index of schema version ``v`` to ``v + 1``. :func:`migrate` runs
every step from a store's version up to :data:`~.schema.SCHEMA_VERSION` in one transaction,
then records the new version in ``meta``, so a failed migration leaves the index as it was.
A store newer than this scdrugmap is refused (see :func:`check_version`), never downgraded.

Adding a version: change the DDL in :mod:`.schema`, bump ``SCHEMA_VERSION``, and add the
step here; ``tests/store/test_migrations.py`` checks that a migrated index has exactly the
tables and columns of a freshly created one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import duckdb

from .._version import __version__
from ..errors import UserError
from .common import DISK_ERRNOS, DiskError, first_line, now
from .schema import MODELS_DDL, PREDICTIONS_DDL, PROBE_PREDICTIONS_DDL, SCHEMA_VERSION, ZERO_SHOT_CACHE_DDL


@dataclass(frozen=True)
class Migration:
    from_version: int
    description: str
    apply: Callable[[duckdb.DuckDBPyConnection], None]


def _columns(con, table: str) -> set[str]:
    return {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()}


def _v1_to_v2(con) -> None:
    # zero_shot_cache was created lazily in version 1: stores made before it lack it
    con.execute(ZERO_SHOT_CACHE_DDL)
    if "origin" not in _columns(con, "provenance"):
        con.execute("ALTER TABLE provenance ADD COLUMN origin VARCHAR DEFAULT 'extracted'")
        con.execute("ALTER TABLE provenance ALTER COLUMN origin SET NOT NULL")


def _v3_models_predictions(con) -> None:
    con.execute(MODELS_DDL)
    con.execute(PREDICTIONS_DDL)


def _v3_probe_predictions(con) -> None:
    con.execute(PROBE_PREDICTIONS_DDL)


def _v3_unlabelled_cells(con) -> None:
    # cells ingested without a label (NULL label), datasets ingested without --label-col
    for table, col in (("cells", "label"), ("cells", "label_raw"), ("datasets", "label_col")):
        nullable = con.execute("SELECT is_nullable FROM information_schema.columns WHERE table_name = ? "
                               "AND column_name = ?", [table, col]).fetchone()[0]
        if nullable == "NO":
            con.execute(f"ALTER TABLE {table} ALTER COLUMN {col} DROP NOT NULL")


# Version 3 is made of independent steps, one per feature that changed the index; each step is
# idempotent (it checks before it alters), so a store part-way between them still migrates.
# Define a step above this list and add it as (description, function).
V3_STEPS: list[tuple[str, Callable[[duckdb.DuckDBPyConnection], None]]] = [
    ("models and predictions tables (scdrugmap fit, scdrugmap predict)", _v3_models_predictions),
    ("probe_predictions (out-of-fold score per cell of each probe run)", _v3_probe_predictions),
    ("unlabelled cells (cells.label, cells.label_raw, datasets.label_col may be NULL)", _v3_unlabelled_cells),
]


def _v2_to_v3(con) -> None:
    for _, step in V3_STEPS:
        step(con)


MIGRATIONS: dict[int, Migration] = {
    1: Migration(1, "provenance.origin (extracted | external); zero_shot_cache always present", _v1_to_v2),
    2: Migration(2, "; ".join(d for d, _ in V3_STEPS) or "no change of shape", _v2_to_v3),
}


def check_version(version: int, where: str) -> None:
    """Refuse a store written by a newer scdrugmap, naming both versions."""
    if version > SCHEMA_VERSION:
        raise UserError(f"{where} has schema version {version}, newer than version {SCHEMA_VERSION} that this "
                        f"scdrugmap ({__version__}) reads: upgrade scdrugmap (pip install -U scdrugmap)")
    if version < 1 or any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
        raise UserError(f"{where} has schema version {version}, which this scdrugmap cannot migrate: "
                        f"it reads versions 1 to {SCHEMA_VERSION}")


def steps(version: int) -> list[Migration]:
    return [MIGRATIONS[v] for v in range(version, SCHEMA_VERSION)]


def migrate(store, version: int) -> list[Migration]:
    """Bring ``store``'s index from ``version`` to the current one; returns the steps run.

    The version is read again inside the write transaction, so two commands that open an old
    store at once migrate it once."""
    where = f"store {store.location}"
    check_version(version, where)
    if not steps(version):
        return []
    if store.read_only and not store.remote:
        raise UserError(f"{where} has schema version {version} and must be migrated to version {SCHEMA_VERSION} "
                        f"before use, but it is read-only ({store.read_only_reason}): run 'scdrugmap store migrate "
                        f"{store.location}' where the store is writable")
    try:
        with store.write_index() as con:
            version = int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
            todo = steps(version)
            for step in todo:
                step.apply(con)
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            if todo:
                con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [f"migrated_from_{version}", f"{now().isoformat()} by scdrugmap {__version__}"])
    except (duckdb.Error, DiskError) as e:
        reason = DISK_ERRNOS.get(e.errno, "refused") if isinstance(e, DiskError) else first_line(e)
        raise UserError(f"{where} has schema version {version} and must be migrated to version {SCHEMA_VERSION} "
                        f"before use, but its index cannot be written ({reason}): run 'scdrugmap store "
                        f"migrate {store.location}' where the store is writable") from None
    return todo
