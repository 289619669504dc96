"""The leaderboard: stored runs ranked by a metric, one ranking per cohort and protocol.

:func:`leaderboard` is the one place that turns ``probe_runs`` and ``probe_results`` into the
table; it builds its SQL from :func:`_columns` (one named expression per output column, so
no two columns can share a name) and ranks in pandas. To add a column (an interval, another
summary), add it to :func:`_columns` or compute it from the per-run frame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import UserError
from ..store.schema import check_metric
from ..store.sql import check_condition, embed
from ..store.store import Store

# protocols a stored run may have: the probe protocols plus ``scdrugmap zero-shot``'s
LEADERBOARD_PROTOCOLS = ("pooled", "cross", "zero-shot")
# what makes two runs "the same configuration": the latest of each is shown unless all_runs
CONFIGURATION = ("backbone", "method", "head", "protocol", "group_by", "coalesce(where_sql, '')", "seed")
SECONDARY_METRIC = "auroc"     # shown beside the ranking metric when that is another one

LEAKY_NOTE = ("leaky = cell-level split (group_by none): cells of one sample are in both train and test, so "
              "scores can reflect sample identity; compare such runs with grouped runs only with care")


def _columns(metric: str, all_runs: bool) -> dict[str, str]:
    """Output column -> SQL expression over ``r`` (a run) and ``x`` (its results)."""
    cols = {"cohort": "coalesce(r.where_sql, '')", "protocol": "r.protocol", "backbone": "r.backbone",
            "method": "r.method", "head": "r.head", "group_by": "r.group_by", "seed": "r.seed",
            metric: f"avg(x.{metric})", f"{metric}_std": f"stddev_samp(x.{metric})",
            "splits": f"count(x.{metric})"}
    if metric != SECONDARY_METRIC:
        cols[SECONDARY_METRIC] = f"avg(x.{SECONDARY_METRIC})"
    cols["cells"] = "r.n_cells"
    if all_runs:
        cols["created_at"] = "r.created_at"
    cols["run_id"] = "r.run_id"
    return cols


def leaderboard(store: Store, metric: str = "f1", protocol: str | None = None, where: str | None = None,
                all_runs: bool = False) -> pd.DataFrame:
    """Runs ranked by ``metric`` (mean over their scored splits) within their cohort and protocol:
    runs on other cells, or under another protocol, are not comparable, so each (cohort,
    protocol) has its own ranks 1, 2, ... ``cohort`` is the run's full ``--where`` ('' for all
    cells); ``leaky`` marks cell-level splits; ``seed`` is the run's seed.

    By default the latest run of each configuration (backbone, method, head, protocol,
    grouping, cohort and seed: a run with another seed is another row, never a replacement);
    with ``all_runs`` every stored run, with its ``created_at``. ``where`` is a condition on
    ``probe_runs``."""
    check_metric(metric)
    if protocol is not None and protocol not in LEADERBOARD_PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}: use one of {', '.join(LEADERBOARD_PROTOCOLS)}")
    conditions, params = ["TRUE"], []
    if protocol:
        conditions.append("protocol = ?")
        params.append(protocol)
    if where:
        conditions.append(embed(check_condition(where, "probe_runs", "--where")))
    latest = "" if all_runs else (f"QUALIFY row_number() OVER (PARTITION BY {', '.join(CONFIGURATION)} "
                                  "ORDER BY created_at DESC, run_id) = 1")
    columns = _columns(metric, all_runs)
    select = ",\n               ".join(f'{expr} AS "{name}"' for name, expr in columns.items())
    query = f"""
        WITH chosen AS (SELECT * FROM probe_runs WHERE {' AND '.join(conditions)} {latest})
        SELECT {select}
        FROM chosen r JOIN probe_results x USING (run_id)
        WHERE x.status <> 'one-class-train'
        GROUP BY ALL"""
    frame = store.sql(query, params)
    if frame.empty:
        raise UserError("no probe results yet" + (" for this selection" if (protocol or where) else "")
                        + ": run 'scdrugmap probe' or 'scdrugmap zero-shot' first")
    order = ["cohort", "protocol", metric, "backbone", "head", "seed"] + (["created_at"] if all_runs else [])
    frame = frame.sort_values(order, ascending=[True, True, False, True, True, True] + [True] * all_runs,
                              na_position="last", kind="stable")
    frame.insert(2, "rank", frame.groupby(["cohort", "protocol"], sort=False).cumcount() + 1)
    frame.insert(frame.columns.get_loc("group_by") + 1, "leaky",
                 np.where((frame["protocol"] == "pooled") & (frame["group_by"] == "none"), "yes", ""))
    return frame.reset_index(drop=True)


def leaderboard_sections(frame: pd.DataFrame):
    """``(heading, table)`` per cohort and protocol of a :func:`leaderboard` frame, in its order:
    the heading 'protocol P, cohort: C' ('all cells' for the whole store), the table without
    those two columns. The terminal, the demo, the report and the web app show these."""
    for (cohort, protocol), part in frame.groupby(["cohort", "protocol"], sort=False):
        yield f"protocol {protocol}, cohort: {cohort if cohort else 'all cells'}", part.drop(columns=["cohort", "protocol"])
