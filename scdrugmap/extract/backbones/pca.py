"""``pca``: principal components of the ``hvg`` panel features — a compact no-weights baseline.

One PCA fit serves every dataset of a store, so that all ``pca`` embeddings share one space.
The fit is made on a seeded random subsample of the cells being extracted and kept in
``DIR/models/pca/<fit_id>.npz``; provenance records its id and the datasets it was fitted on.
Datasets extracted later are projected with the existing fit. The fit is redone only when
every dataset that has ``pca`` embeddings is being (re-)extracted, e.g. ``--force`` on all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import numpy as np

from ...errors import UserError
from ...store.common import disk_error_or
from .hvg import PanelExpression
from ..registry import Option, register


@register
class PanelPCA(PanelExpression):
    name = "pca"
    summary = "50 principal components of the hvg panel features, one fit per store"
    default_dim = 50
    options = {
        **PanelExpression.options,
        "n_components": Option(50, "number of components", int, min=1),
        "fit_cells": Option(50_000, "at most this many cells (seeded sample) are used for the fit", int, min=2),
        "seed": Option(0, "seed of the fit's cell sample and solver", int, min=0),
    }

    fit = None

    @property
    def dim(self) -> int:
        return self.config["n_components"]

    def encoder(self, source):
        features = super().encoder(source)

        def encode(block):
            return (features(block) - self.fit["mean"]) @ self.fit["components"].T

        return encode

    def prepare(self, store, sources) -> None:
        existing = store.provenance(self.name)
        redo = {s.name for s in sources}
        kept = existing[~existing["dataset"].isin(redo)]
        if len(kept):
            params = json.loads(kept.iloc[0]["params"])
            for key in ("n_components", "panel_sha256"):
                mine = self.params()[key] if key != "n_components" else self.dim
                if params.get(key) != mine:
                    raise UserError(f"the store's pca embeddings use {key}={params.get(key)}, not {mine}: "
                                    "re-extract every dataset with --force to change it")
            self.fit = dict(np.load(store.path / "models" / "pca" / f"{params['fit_id']}.npz"))
            self.fit["fit_id"] = params["fit_id"]
            return
        self.fit = self._fit(sources)
        folder = store.path / "models" / "pca"
        made = [p for p in (folder.parent, folder) if not p.exists()]
        # write-then-rename: under torchrun every rank saves the same (deterministic) fit
        final = folder / f"{self.fit['fit_id']}.npz"
        tmp = folder / f".{final.stem}.{os.getpid()}.npz"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **{k: v for k, v in self.fit.items() if k != "fit_id"})
            os.replace(tmp, final)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            for p in reversed(made):
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise disk_error_or(e, folder, "saving the pca fit")

    def undo_prepare(self, store) -> None:
        if self.fit is None:
            return
        used = {json.loads(p).get("fit_id") for p in store.provenance(self.name)["params"]}
        if self.fit["fit_id"] not in used:
            folder = store.path / "models" / "pca"
            (folder / f"{self.fit['fit_id']}.npz").unlink(missing_ok=True)
            for p in (folder, folder.parent):
                with contextlib.suppress(OSError):
                    p.rmdir()

    def _fit(self, sources) -> dict:
        from sklearn.decomposition import PCA

        cfg = self.config
        rng = np.random.default_rng(cfg["seed"])
        total = sum(s.n_cells for s in sources)
        take = min(total, cfg["fit_cells"])
        picked = np.sort(rng.choice(total, size=take, replace=False))
        blocks, offset = [], 0
        for source in sources:
            rows = picked[(picked >= offset) & (picked < offset + source.n_cells)] - offset
            offset += source.n_cells
            if len(rows):
                features = super().encoder(source)
                blocks.append(features(source.rows(0, source.n_cells)[rows]))
        X = np.vstack(blocks)
        k = self.dim
        if k > min(X.shape):
            raise UserError(f"pca needs n_components <= min(cells, panel genes) = {min(X.shape)}: "
                            f"pass --option n_components=N")
        pca = PCA(n_components=k, svd_solver="randomized", random_state=cfg["seed"]).fit(X)
        fitted_on = sorted(s.name for s in sources)
        key = json.dumps({"params": self.params(), "fitted_on": fitted_on, "n_fit": take}, sort_keys=True)
        return {"mean": pca.mean_.astype(np.float32), "components": pca.components_.astype(np.float32),
                "explained_variance_ratio": pca.explained_variance_ratio_,
                "fitted_on": np.array(fitted_on), "n_fit": np.array(take),
                "fit_id": hashlib.sha256(key.encode()).hexdigest()[:16]}

    def dataset_params(self, source) -> dict:
        return {**super().dataset_params(source), "fit_id": self.fit["fit_id"],
                "fitted_on": [str(x) for x in self.fit["fitted_on"]], "n_fit_cells": int(self.fit["n_fit"]),
                "space_id": f"pca:{self.fit['fit_id']}"}

    def params(self) -> dict:
        return {**super().params(), "n_components": self.dim, "fit_cells": self.config["fit_cells"],
                "seed": self.config["seed"]}
