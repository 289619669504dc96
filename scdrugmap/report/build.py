"""Assemble the report: sections of HTML tables and embedded PNG figures in one file.

Nothing in the file is fetched from a network: figures are base64 ``data:`` URIs and the style
sheet is inline, so the file opens anywhere and can be mailed.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import UserError
from ..progress import progress_bar
from ..store.common import check_writable_dir, disk_error_or, now
from . import figures

STYLE = """
body{font-family:sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left}th{background:#f3f3f3}
img{max-width:100%;display:block;margin:.5em 0}p.note{color:#555;font-size:.9em}
"""


class _Page:
    def __init__(self):
        self.sections: list[tuple[str, str, list[str]]] = []
        self.n_figures = 0

    def section(self, key: str, title: str) -> list[str]:
        parts: list[str] = []
        self.sections.append((key, title, parts))
        return parts

    def figure(self, parts: list[str], png: bytes, alt: str) -> None:
        self.n_figures += 1
        parts.append(f'<img class="figure" alt="{html.escape(alt)}" src="{figures.png_uri(png)}">')

    def html(self, title: str) -> str:
        nav = " · ".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t, _ in self.sections)
        body = "\n".join(f'<section id="{k}"><h2>{html.escape(t)}</h2>\n' + "\n".join(p) + "</section>"
                         for k, t, p in self.sections)
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}"
                "</body></html>\n")


def cell_text(value, floatfmt: str = "{:.3f}") -> str:
    """A table cell as text in the report and the web app: numbers rounded, missing values empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(value) else floatfmt.format(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(map(str, value))
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def _table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell_text(v, floatfmt))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def build_report(store, out, metric: str = "f1", n_bootstrap: int = 200, ci_seed: int = 0, map_cells: int = 3000,
                 map_seed: int = 0, map_method: str = "auto", show_progress: bool = True) -> dict:
    """Write the report of ``store`` to ``out``; ``{"bytes", "figures", "seconds"}``."""
    from ..probe.leaderboard import leaderboard
    from ..store.schema import check_metric

    start = time.perf_counter()
    check_metric(metric)
    method = resolve_map_method(map_method)  # before any work: a missing extra is a one-line error
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name such as report.html")
    check_writable_dir(out.parent if str(out.parent) else Path("."), out.name)   # before the work, not after
    datasets = store.datasets()
    if datasets.empty:
        raise UserError("the store has no datasets yet: run 'scdrugmap ingest' and 'scdrugmap probe' first")
    try:
        board = leaderboard(store, metric=metric)
    except UserError:
        board = pd.DataFrame()
    page = _Page()
    backbones = store.extracted_backbones()
    with progress_bar("report", total=5 + len(backbones), enabled=show_progress) as advance:
        _leaderboard(page, store, board, metric, n_bootstrap, ci_seed)
        advance(1)
        _curves(page, store, board)
        advance(1)
        _cross(page, store, board, metric)
        _leakage(page, board, metric)
        advance(1)
        maps = page.section("maps", "Embedding maps")
        for backbone in backbones:
            _map(page, maps, store, backbone, map_cells, map_seed, method)
            advance(1)
        if not backbones:
            maps.append(_note("no embeddings in the store yet (scdrugmap extract)."))
        _tables(page, store, datasets)
        advance(1)
        _predictions(page, store)
        advance(1)
    text = page.html(f"scdrugmap report — {store.location}")
    text = text.replace("</h1>", f"</h1>{_note(f'written {now():%Y-%m-%d %H:%M} UTC by scdrugmap {__version__}')}", 1)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error_or(e, out, "writing the report") from None
    return {"bytes": out.stat().st_size, "figures": page.n_figures, "seconds": time.perf_counter() - start}


def _leaderboard(page, store, board, metric, n_bootstrap, ci_seed) -> None:
    from ..probe.confidence import add_intervals
    from ..probe.leaderboard import leaderboard_sections

    parts = page.section("leaderboard", "Leaderboard")
    if board.empty:
        parts.append(_note("no probe runs yet (scdrugmap probe)."))
        return
    board = add_intervals(store, board, metric, n=n_bootstrap, seed=ci_seed)
    parts.append(_note(f"{metric}: mean over splits; {metric}_low/{metric}_high: 95 % bootstrap interval "
                       f"({n_bootstrap} replicates, seed {ci_seed}; cells resampled within splits, or whole "
                       "samples/patients when the splits were grouped). leaky = cell-level split."))
    for heading, part in leaderboard_sections(board):
        parts.append(f"<h3>{html.escape(heading)}</h3>")
        parts.append(_table(part))


def _scores(store, run_ids) -> pd.DataFrame:
    if not len(run_ids):
        return pd.DataFrame(columns=["run_id", "score", "label"])
    return store.sql("SELECT run_id, score, label FROM probe_predictions WHERE list_contains(?, run_id)",
                     [list(run_ids)])


def _curves(page, store, board) -> None:
    parts = page.section("curves", "ROC and precision-recall curves")
    if board.empty:
        parts.append(_note("no probe runs yet."))
        return
    scores = _scores(store, board["run_id"])
    drawn = 0
    for (cohort, protocol, group_by), part in board.groupby(["cohort", "protocol", "group_by"], sort=False):
        runs = []
        for row in part.itertuples(index=False):
            s = scores[scores["run_id"] == row.run_id]
            if len(s):
                runs.append((f"{row.backbone} · {row.head}", s["label"].to_numpy(), s["score"].to_numpy()))
        if runs:
            split = "cell-level split (leaky)" if group_by == "none" else f"split by {group_by}"
            title = f"protocol {protocol} ({split}), cohort: {cohort or 'all cells'}"
            page.figure(parts, figures.curves(runs, title), f"ROC and PR curves, {title}")
            drawn += 1
    if not drawn:
        parts.append(_note("no stored per-cell scores (runs made by an older scdrugmap, or zero-shot only)."))


def _cross(page, store, board, metric) -> None:
    parts = page.section("cross", "Cross-dataset matrix")
    cross = board[board["protocol"] == "cross"] if not board.empty else board
    if cross.empty:
        parts.append(_note("no cross-dataset runs (scdrugmap probe --protocol cross)."))
        return
    results = store.sql(f"SELECT run_id, split, {metric} FROM probe_results WHERE list_contains(?, run_id)",
                        [list(cross["run_id"])])
    names = {r.run_id: f"{r.backbone} · {r.head}" for r in cross.itertuples(index=False)}
    results["configuration"] = results["run_id"].map(names)
    for cohort, part in cross.groupby("cohort", sort=False):
        mine = results[results["run_id"].isin(part["run_id"])]
        table = mine.pivot_table(index="split", columns="configuration", values=metric, aggfunc="mean")
        title = f"{metric} per held-out dataset, cohort: {cohort or 'all cells'}"
        page.figure(parts, figures.matrix(table, metric, title), title)


def _leakage(page, board, metric) -> None:
    parts = page.section("leakage", "Leakage gap")
    pooled = board[board["protocol"] == "pooled"] if not board.empty else board
    rows = []
    for (cohort, backbone, method, head), part in pooled.groupby(["cohort", "backbone", "method", "head"], sort=False):
        leaky = part[part["group_by"] == "none"]
        grouped = part[part["group_by"] != "none"]
        for g in grouped.itertuples(index=False):
            if len(leaky):
                cell = float(leaky[metric].iloc[0])
                rows.append({"configuration": f"{backbone} · {head} ({g.group_by})", "cohort": cohort or "all cells",
                             "grouped": float(getattr(g, metric)), "cell_level": cell,
                             "gap": cell - float(getattr(g, metric))})
    if not rows:
        parts.append(_note("no cohort was split both by group and by cell (scdrugmap probe --group-by none, "
                           "beside a grouped run, shows how much cell-level splits overstate)."))
        return
    frame = pd.DataFrame(rows)
    parts.append(_note(f"gap = {metric} of the cell-level split minus that of the grouped split: cells of one "
                       "sample on both sides of a split let a head recognise the sample rather than the response."))
    parts.append(_table(frame))
    page.figure(parts, figures.leakage(frame, metric), "leakage gap")


MAP_METHODS = ("auto", "umap", "pca")


def resolve_map_method(choice: str) -> str:
    """'UMAP' or 'PCA': auto means UMAP where the scdrugmap[umap] extra is installed."""
    if choice not in MAP_METHODS:
        raise UserError(f"unknown map method {choice!r}: use one of {', '.join(MAP_METHODS)}")
    if choice == "pca":
        return "PCA"
    try:
        import umap  # noqa: F401  (the scdrugmap[umap] extra)
    except ImportError:
        if choice == "umap":
            raise UserError("UMAP maps need umap-learn: pip install 'scdrugmap[umap]', or use --map pca") from None
        return "PCA"
    return "UMAP"


def _map(page, parts, store, backbone, map_cells, map_seed, method: str) -> None:
    """A 2-D map of ``backbone``'s embeddings by ``method`` ('UMAP' or 'PCA', see :func:`resolve_map_method`)."""
    cells = store.cells(datasets=list(store.provenance(backbone)["dataset"]), columns=["label"])
    n = len(cells)
    if n > map_cells:
        rng = np.random.default_rng(map_seed)
        cells = cells.iloc[np.sort(rng.choice(n, map_cells, replace=False))].reset_index(drop=True)
    X = store.load_rows(backbone, cells, np.float32)
    if method == "UMAP":
        import umap

        # n_jobs=1: with a random_state UMAP runs single-threaded anyway, and says so in a warning
        xy = umap.UMAP(random_state=map_seed, n_jobs=1).fit_transform(X)
    else:
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=map_seed).fit_transform(X) if X.shape[1] >= 2 else \
            np.column_stack([X[:, 0], np.zeros(len(X))])
    subsample = f"{len(cells):,} of {n:,} cells (seed {map_seed})" if n > len(cells) else f"all {n:,} cells"
    title = f"{backbone}: {method} of its embeddings, {subsample}"
    page.figure(parts, figures.embedding_map(xy, cells["label"], cells["dataset"], title), title)


def _tables(page, store, datasets) -> None:
    parts = page.section("datasets", "Datasets")
    parts.append(_table(datasets))
    parts = page.section("provenance", "Provenance of the embeddings")
    prov = store.provenance()
    keep = [c for c in ("backbone", "dataset", "n_cells", "dim", "dtype", "origin", "checkpoint_sha256",
                        "source_sha256", "scdrugmap_version", "created_at", "params") if c in prov.columns]
    parts.append(_table(prov[keep]) if len(prov) else _note("no embeddings yet."))


def _predictions(page, store) -> None:
    """Per-patient summary of what 'scdrugmap predict' stored, if anything (the same summary
    and intervals as its output, from :func:`scdrugmap.inference.predict.summarise`)."""
    from ..inference.predict import summarise

    frame = store.sql('SELECT p.dataset, p.model, p.probability, p."call", c.patient, c.sample '
                      'FROM predictions p LEFT JOIN cells c USING (dataset, "row") ORDER BY p.model, p.dataset, p."row"')
    if frame.empty:
        return
    parts = page.section("predictions", "Predictions per patient")
    rows = []
    for (model, dataset), part in frame.groupby(["model", "dataset"], sort=True):
        summary = summarise(part.reset_index(drop=True), seed=0, n_boot=200)
        levels = set(summary["level"])
        level = next(lv for lv in ("patient", "sample", "dataset") if lv in levels)
        for r in summary[summary["level"] == level].itertuples():
            rows.append({"model": model, "dataset": dataset, "level": level, "group": r.group, "cells": r.n_cells,
                         "mean_probability": r.mean_probability, "low": r.ci_low, "high": r.ci_high,
                         "fraction_resistant": r.fraction_resistant})
    summary = pd.DataFrame(rows)
    parts.append(_note("low/high: 95 % bootstrap interval of the mean probability (cells resampled, 200 "
                       "replicates, seed 0; samples where the dataset names no patients)."))
    parts.append(_table(summary))
    summary["label"] = summary["dataset"].astype(str) + " · " + summary["group"].astype(str)
    page.figure(parts, figures.patients(summary), "predictions per patient")
