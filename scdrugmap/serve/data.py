"""What the pages show, as frames and figures (the report's figure code, per run)."""

from __future__ import annotations

import threading

import pandas as pd

from ..errors import UserError
from ..report.build import cell_text
from ..store.store import Store

BASELINES = ("hvg", "pca")        # backbones without weights: what an upload is extracted with
MAX_SQL_ROWS = 500                # rows shown in the SQL box (the CSV download has them all)


def table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> dict:
    """A frame as ``{"columns", "rows"}`` of text, for the templates (which escape it)."""
    numeric = [frame[c].dtype.kind in "iuf" for c in frame.columns]
    return {"columns": [str(c) for c in frame.columns], "numeric": numeric,
            "rows": [[cell_text(v, floatfmt) for v in row] for row in frame.itertuples(index=False)]}


def datasets(store: Store) -> pd.DataFrame:
    keep = ["dataset", "n_cells", "n_sensitive", "n_resistant", "n_genes", "value_kind", "drug", "cancer_type",
            "tissue", "therapy", "regimen", "ingested_at"]
    frame = store.datasets()
    return frame[[c for c in keep if c in frame.columns]]


def dataset_counts(store: Store, name: str) -> dict[str, pd.DataFrame]:
    """Cell counts of one dataset by label, sample and patient."""
    out = {}
    for by in ("label", "sample", "patient"):
        out[by] = store.sql(f'SELECT "{by}", count(*) AS cells, count(*) FILTER (label = \'resistant\') AS resistant, '
                            f'count(*) FILTER (label = \'sensitive\') AS sensitive FROM cells WHERE dataset = ? '
                            f'GROUP BY ALL ORDER BY "{by}"', [name])
    return out


_BOARDS: dict = {}               # the last leaderboards shown, by request and state of the index
_BOARDS_KEPT = 16
_BOARDS_LOCK = threading.Lock()


def index_state(store: Store) -> tuple:
    """Changes whenever the index does (its file or its write-ahead log)."""
    out = []
    for path in (store.index_path, store.index_path.with_name(store.index_path.name + ".wal")):
        try:
            st = path.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def leaderboard(store: Store, metric: str, protocol: str | None, head: str | None, bootstrap: int, seed: int = 0):
    """:func:`compute_leaderboard`, kept while the index is unchanged (the intervals of a
    paper-size store take seconds; a reload or another filter of the same page does not)."""
    key = (str(store.path), metric, protocol, head, bootstrap, seed, index_state(store))
    with _BOARDS_LOCK:
        kept = _BOARDS.get(key)
    if kept is None:
        kept = compute_leaderboard(store, metric, protocol, head, bootstrap, seed)
        with _BOARDS_LOCK:
            while len(_BOARDS) >= _BOARDS_KEPT:
                _BOARDS.pop(next(iter(_BOARDS)))
            _BOARDS[key] = kept
    return kept.copy()


def compute_leaderboard(store: Store, metric: str, protocol: str | None, head: str | None, bootstrap: int,
                        seed: int = 0):
    """The leaderboard (latest run of each configuration), filtered, with bootstrap intervals."""
    from ..probe.confidence import add_intervals
    from ..probe.leaderboard import leaderboard as board

    frame = board(store, metric=metric, protocol=protocol)
    if head:
        frame = frame[frame["head"] == head].reset_index(drop=True)
        if frame.empty:
            raise UserError(f"no runs with head {head!r} for this selection: choose another head or protocol")
    if bootstrap and len(frame):
        frame = add_intervals(store, frame, metric, n=bootstrap, seed=seed)
    return frame


def heads(store: Store) -> list[str]:
    return list(store.sql("SELECT DISTINCT head FROM probe_runs ORDER BY head")["head"])


def run_page(store: Store, run_id: str, metric: str = "f1") -> dict | None:
    """A run's settings, its per-split results and its figures (ROC/PR of its out-of-fold
    scores; per held-out dataset for a cross run); None when there is no such run."""
    from ..report import figures

    runs = store.sql("SELECT * FROM probe_runs WHERE run_id = ?", [run_id])
    if runs.empty:
        return None
    run = runs.iloc[0].to_dict()
    results = store.sql("SELECT * FROM probe_results WHERE run_id = ? ORDER BY split", [run_id])
    results = results.drop(columns="run_id")
    figs = []
    scores = store.sql("SELECT score, label FROM probe_predictions WHERE run_id = ?", [run_id])
    name = f"{run['backbone']} · {run['head']}"
    if len(scores):
        title = f"run {run_id}: {name}, protocol {run['protocol']}, split by {run['group_by']}"
        figs.append((title, figures.png_uri(figures.curves([(name, scores["label"].to_numpy(),
                                                     scores["score"].to_numpy(dtype=float))], title))))
    if run["protocol"] == "cross" and len(results) and metric in results.columns:
        matrix = results.pivot_table(index="split", values=metric, aggfunc="mean").rename(columns={metric: name})
        title = f"{metric} per held-out dataset, run {run_id}"
        figs.append((title, figures.png_uri(figures.matrix(matrix, metric, title))))
    settings = {k: cell_text(v) for k, v in run.items()}
    return {"settings": settings, "results": results, "figures": figs}


def model_names(store: Store) -> list[str]:
    return list(store.sql("SELECT name FROM models ORDER BY name")["name"])


def predictions(store: Store, model: str, dataset: str) -> pd.DataFrame:
    return store.sql('SELECT p.dataset, p."row", c.obs_name, c.sample, c.patient, c.label, p.probability, p."call" '
                     'FROM predictions p LEFT JOIN cells c USING (dataset, "row") WHERE p.model = ? AND '
                     'p.dataset = ? ORDER BY p."row"', [model, dataset])
