"""Bootstrap confidence intervals and paired comparisons of probe runs, from their stored
out-of-fold scores (``probe_predictions``).

A run's metric is the mean over its scored splits of the metric on each split's held-out
cells (as the leaderboard shows it). One bootstrap replicate resamples, within every split,
its held-out cells with replacement, or its whole groups when the run's splits were grouped
(by sample or patient; by sample when the run held out whole datasets, since a split then
holds one dataset), recomputes the metric of every split and averages them. The interval is
the 2.5 and 97.5 percentiles of the replicates (percentile bootstrap). Everything is seeded:
the same seed gives the same intervals.

Two runs are compared on the same splits and cells: each replicate draws the same cells for
both, so the interval of the difference reflects the runs' difference, not the cohort's
sampling. Per split, the signs of the differences give a sign test and a Wilcoxon
signed-rank test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import UserError
from ..store.schema import check_metric
from .metrics import score

CI_LEVEL = 0.95
DEFAULT_BOOTSTRAP = 1000


def _metric(metric: str, y: np.ndarray, s: np.ndarray) -> float:
    """``metric`` of scores ``s`` against labels ``y``; fast paths for the common ones."""
    if len(y) == 0:
        return np.nan
    if metric in ("f1", "precision", "recall", "accuracy"):
        pred = s >= 0.5
        tp = int(np.sum(pred & (y == 1)))
        fp = int(np.sum(pred & (y == 0)))
        fn = int(np.sum(~pred & (y == 1)))
        if metric == "f1":
            return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
        if metric == "precision":
            return tp / (tp + fp) if tp + fp else 0.0
        if metric == "recall":
            return tp / (tp + fn) if tp + fn else 0.0
        return float(np.mean(pred == (y == 1)))
    if metric == "auroc":
        n_pos = int(y.sum())
        n_neg = len(y) - n_pos
        if n_pos == 0 or n_neg == 0:
            return np.nan
        from scipy.stats import rankdata

        ranks = rankdata(s)
        return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    if len(np.unique(y)) < 2 and metric in ("auprc", "mcc"):
        return np.nan
    return float(score(y, s)[metric])


def run_predictions(store, run_id: str) -> pd.DataFrame:
    """A run's stored out-of-fold scores with each cell's sample and patient."""
    return store.sql(
        "SELECT p.split, p.dataset, p.\"row\", p.score, p.label, c.sample, c.patient "
        "FROM probe_predictions p LEFT JOIN cells c USING (dataset, \"row\") WHERE p.run_id = ? "
        "ORDER BY p.split, p.dataset, p.\"row\"", [run_id])


def _group_key(frame: pd.DataFrame, group_by: str) -> np.ndarray | None:
    """Resampling unit of each cell: None for cells, else a group code per cell."""
    if group_by in (None, "", "none"):
        return None
    column = group_by if group_by in ("sample", "patient") else "sample"
    keys = frame["dataset"].astype(str) + "\x00" + frame[column].astype(str)
    return pd.factorize(keys)[0]


@dataclass
class _Split:
    name: str
    y: np.ndarray
    s: np.ndarray                         # scores (one column per run when paired)
    groups: list = field(default_factory=list)  # index arrays of each group (empty: cells)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        if not self.groups:
            return rng.integers(0, len(self.y), len(self.y))
        picks = rng.integers(0, len(self.groups), len(self.groups))
        return np.concatenate([self.groups[i] for i in picks])


def _splits(frame: pd.DataFrame, score_columns: list[str], group_by: str) -> list[_Split]:
    out = []
    for name, part in frame.groupby("split", sort=True):
        keys = _group_key(part, group_by)
        groups = [] if keys is None else [np.flatnonzero(keys == k) for k in range(keys.max() + 1)]
        out.append(_Split(str(name), part["label"].to_numpy().astype(np.int8),
                          part[score_columns].to_numpy(dtype=np.float64), groups))
    return out


def _replicates(splits: list[_Split], metric: str, n: int, seed: int, columns: int) -> np.ndarray:
    """``n`` x ``columns`` bootstrap replicates of the mean-over-splits metric."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, columns))
    for b in range(n):
        per_split = np.full((len(splits), columns), np.nan)
        for i, sp in enumerate(splits):
            idx = sp.draw(rng)
            y = sp.y[idx]
            for c in range(columns):
                per_split[i, c] = _metric(metric, y, sp.s[idx, c])
        with np.errstate(all="ignore"):
            out[b] = np.nanmean(per_split, axis=0) if np.isfinite(per_split).any() else np.nan
    return out


def _check(metric: str, n: int) -> None:
    check_metric(metric)
    if n < 1:
        raise UserError(f"--bootstrap must be at least 1, got {n}")


def run_interval(store, run_id: str, metric: str = "f1", n: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                 group_by: str | None = None) -> tuple[float, float]:
    """(low, high) 95 % bootstrap interval of a run's metric; (nan, nan) without stored scores."""
    _check(metric, n)
    if group_by is None:
        row = store.sql("SELECT group_by FROM probe_runs WHERE run_id = ?", [run_id])
        group_by = row["group_by"].iloc[0] if len(row) else "none"
    frame = run_predictions(store, run_id)
    if frame.empty:
        return np.nan, np.nan
    reps = _replicates(_splits(frame, ["score"], group_by), metric, n, seed, 1)[:, 0]
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return np.nan, np.nan
    alpha = (1 - CI_LEVEL) / 2
    return float(np.quantile(reps, alpha)), float(np.quantile(reps, 1 - alpha))


def add_intervals(store, frame: pd.DataFrame, metric: str, n: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  ) -> pd.DataFrame:
    """The leaderboard ``frame`` with ``<metric>_low`` / ``<metric>_high`` columns (95 % bootstrap
    interval) placed after ``<metric>``; empty where a run has no stored scores (zero-shot,
    runs made before scores were stored)."""
    _check(metric, n)
    lows, highs = [], []
    for run_id, group_by in zip(frame["run_id"], frame["group_by"]):
        low, high = run_interval(store, run_id, metric, n, seed, group_by)
        lows.append(low)
        highs.append(high)
    out = frame.copy()
    at = out.columns.get_loc(metric) + 1
    out.insert(at, f"{metric}_low", lows)
    out.insert(at + 1, f"{metric}_high", highs)
    return out


@dataclass
class Comparison:
    run_a: str
    run_b: str
    metric: str
    a: float                               # mean-over-splits metric of each run
    b: float
    difference: float                      # a - b
    low: float                             # 95 % paired bootstrap interval of the difference
    high: float
    p_bootstrap: float                     # two-sided: share of replicates on the other side of 0, doubled
    per_split: pd.DataFrame                # split, a, b, difference
    sign_p: float
    wilcoxon_p: float
    n_bootstrap: int
    seed: int
    group_by: str

    def lines(self) -> list[str]:
        m = self.metric
        verdict = ("the interval excludes 0: the difference is unlikely to be chance"
                   if self.low > 0 or self.high < 0 else "the interval includes 0: no clear difference")
        return [
            f"{m} of {self.run_a}: {self.a:.4f}; of {self.run_b}: {self.b:.4f}",
            f"difference (A - B): {self.difference:+.4f}, 95 % paired bootstrap interval "
            f"[{self.low:+.4f}, {self.high:+.4f}] ({self.n_bootstrap} replicates, seed {self.seed}, "
            f"resampling {'cells' if self.group_by in ('none', '') else 'groups'} within splits); "
            f"bootstrap p = {self.p_bootstrap:.4f}",
            f"per split: A better in {int((self.per_split['difference'] > 0).sum())}, B better in "
            f"{int((self.per_split['difference'] < 0).sum())} of {len(self.per_split)}; sign test p = "
            f"{self.sign_p:.4f}; Wilcoxon signed-rank p = {self.wilcoxon_p:.4f}",
            verdict,
        ]


def compare_runs(store, run_a: str, run_b: str, metric: str = "f1", n: int = DEFAULT_BOOTSTRAP,
                 seed: int = 0) -> Comparison:
    """Paired comparison of two runs on the same splits and cells (see the module's text).
    Refuses runs that are not comparable, saying why."""
    _check(metric, n)
    runs = store.sql("SELECT run_id, group_by, positive_label FROM probe_runs WHERE list_contains(?, run_id)",
                     [[run_a, run_b]]).set_index("run_id")
    for run in (run_a, run_b):
        if run not in runs.index:
            raise UserError(f"no probe run {run!r} in the store: see 'scdrugmap leaderboard' for run ids")
    if run_a == run_b:
        raise UserError("the two runs are the same run: give two different run ids")
    a, b = run_predictions(store, run_a), run_predictions(store, run_b)
    for run, frame in ((run_a, a), (run_b, b)):
        if frame.empty:
            raise UserError(f"run {run!r} has no stored per-cell scores (zero-shot, or made by an older "
                            "scdrugmap): run it again with 'scdrugmap probe' to compare it")
    if runs.loc[run_a, "positive_label"] != runs.loc[run_b, "positive_label"]:
        raise UserError("the runs are not comparable: they score different positive labels "
                        f"({runs.loc[run_a, 'positive_label']} vs {runs.loc[run_b, 'positive_label']})")
    keys = ["split", "dataset", "row"]
    if set(a["split"]) != set(b["split"]):
        raise UserError("the runs are not comparable: their splits differ "
                        f"({', '.join(sorted(set(a['split'])))} vs {', '.join(sorted(set(b['split'])))}); "
                        "compare runs of the same cohort, protocol, grouping and seed")
    if len(a) != len(b) or not a[keys].reset_index(drop=True).equals(b[keys].reset_index(drop=True)):
        raise UserError("the runs are not comparable: their splits hold different cells (another cohort, "
                        "grouping or seed); compare runs of the same cohort, protocol, grouping and seed")
    group_a, group_b = runs.loc[run_a, "group_by"], runs.loc[run_b, "group_by"]
    group_by = group_a if group_a == group_b else "none"
    paired = a.assign(score_b=b["score"].to_numpy())
    splits = _splits(paired, ["score", "score_b"], group_by)
    per_split = pd.DataFrame([{"split": sp.name, "a": _metric(metric, sp.y, sp.s[:, 0]),
                               "b": _metric(metric, sp.y, sp.s[:, 1])} for sp in splits])
    per_split["difference"] = per_split["a"] - per_split["b"]
    reps = _replicates(splits, metric, n, seed, 2)
    diff = reps[:, 0] - reps[:, 1]
    diff = diff[np.isfinite(diff)]
    alpha = (1 - CI_LEVEL) / 2
    mean_a, mean_b = float(np.nanmean(per_split["a"])), float(np.nanmean(per_split["b"]))
    low, high = (float(np.quantile(diff, alpha)), float(np.quantile(diff, 1 - alpha))) if len(diff) else (np.nan,) * 2
    p_boot = float(min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0)))) if len(diff) else np.nan
    d = per_split["difference"].dropna().to_numpy()
    nonzero = d[d != 0]
    from scipy.stats import binomtest, wilcoxon

    sign_p = float(binomtest(int((nonzero > 0).sum()), len(nonzero)).pvalue) if len(nonzero) else 1.0
    wilcoxon_p = float(wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    return Comparison(run_a, run_b, metric, mean_a, mean_b, mean_a - mean_b, low, high, p_boot, per_split,
                      sign_p, wilcoxon_p, n, seed, group_by)
