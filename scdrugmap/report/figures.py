"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def png_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI: the report and the web app embed figures, never fetch them."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def curves(runs: list[tuple[str, np.ndarray, np.ndarray]], title: str) -> bytes:
    """ROC and precision-recall curves of the out-of-fold scores of each ``(name, labels, scores)``."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    plt = _plt()
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    base = None
    for name, y, s in runs:
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        roc_ax.plot(fpr, tpr, lw=1.4, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(y, s)
        pr_ax.plot(recall, precision, lw=1.4, label=name)
        base = float(np.mean(y))
    roc_ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (pooled out-of-fold cells)")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    if base is not None:
        pr_ax.axhline(base, ls=":", c="grey", lw=1, label=f"prevalence {base:.2f}")
    roc_ax.legend(fontsize=7, loc="lower right")
    pr_ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def matrix(table: pd.DataFrame, metric: str, title: str) -> bytes:
    """Heatmap of ``table`` (held-out dataset x configuration) with the values written in."""
    plt = _plt()
    values = table.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * table.shape[1], 1.2 + 0.45 * table.shape[0]))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 0.6 else "black")
    ax.set(xlabel="backbone · head", ylabel="held-out dataset", title=title)
    fig.colorbar(image, ax=ax, label=metric, shrink=0.8)
    return _png(fig)


def leakage(frame: pd.DataFrame, metric: str) -> bytes:
    """Grouped vs cell-level metric per configuration (bars)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(frame) + 2), 3.6))
    x = np.arange(len(frame))
    ax.bar(x - 0.2, frame["grouped"], 0.4, label="grouped split")
    ax.bar(x + 0.2, frame["cell_level"], 0.4, label="cell-level split (leaky)")
    ax.set_xticks(x, frame["configuration"], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=metric, ylim=(0, 1.05), title="leakage gap: the same cohort split by group and by cell")
    ax.legend(fontsize=8)
    return _png(fig)


def embedding_map(xy: np.ndarray, labels: pd.Series, datasets: pd.Series, title: str) -> bytes:
    """Two scatter panels of the 2-D map: coloured by label and by dataset."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, values, name in ((axes[0], labels, "label"), (axes[1], datasets, "dataset")):
        values = values.astype(object).where(values.notna(), "unlabelled").astype(str)   # NULL: unlabelled cell
        for k, value in enumerate(sorted(values.unique())):
            mask = (values == value).to_numpy()
            ax.scatter(xy[mask, 0], xy[mask, 1], s=3, alpha=0.6, color=plt.cm.tab10(k % 10), label=value,
                       rasterized=True)
        ax.set(title=f"coloured by {name}", xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=3, loc="best")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def patients(frame: pd.DataFrame) -> bytes:
    """Mean probability of resistance per patient, with its 95 % interval."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(frame) + 2), 3.6))
    x = np.arange(len(frame))
    err = np.vstack([frame["mean_probability"] - frame["low"], frame["high"] - frame["mean_probability"]])
    ax.bar(x, frame["mean_probability"], yerr=np.clip(err, 0, None), capsize=2, color="tab:red", alpha=0.7)
    ax.set_xticks(x, frame["label"], rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="mean probability of resistance", ylim=(0, 1.05), title="predictions per patient")
    return _png(fig)
