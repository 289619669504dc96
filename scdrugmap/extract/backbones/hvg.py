"""``hvg``: normalised expression of a fixed gene panel — the no-weights reference point.

Published evaluations of single-cell foundation models find that such simple baselines
often match them; a benchmark must always be able to show that. Features: counts per
10,000 (cell total over all its genes), log1p, on the panel genes in panel order; genes a
dataset lacks are 0 (the count of genes found is kept in provenance).
"""

from __future__ import annotations

from ...errors import UserError
from ..panel import DEFAULT_PANEL, load_panel, panel_columns, panel_features
from ..registry import Backbone, Option, register


@register
class PanelExpression(Backbone):
    name = "hvg"
    summary = "log1p counts-per-10k of a fixed gene panel (default: 978 L1000 landmark genes)"
    value_kinds = ("counts", "normalized", "log1p", "scaled")
    values_needed = "expression values"
    default_dim = 978
    options = {"panel": Option(DEFAULT_PANEL, "'l1000' or a file of gene symbols, one per line")}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.panel = load_panel(self.config["panel"])

    @property
    def dim(self) -> int:
        return len(self.panel)

    def mapping(self, source):
        entrez = source.entrez_ids() if hasattr(source, "entrez_ids") else None
        src_cols, dst = panel_columns(self.panel, source.symbols(), entrez)
        if len(dst) == 0:
            raise UserError(f"dataset {source.name!r} shares no gene with the {self.panel.name} panel: "
                            "check its gene symbols, or pass --option panel=FILE")
        return src_cols, dst

    def encoder(self, source):
        src_cols, dst = self.mapping(source)
        n_panel = len(self.panel)
        return lambda block: panel_features(block, src_cols, dst, n_panel, source.value_kind)

    def dataset_params(self, source) -> dict:
        return {"panel_genes_found": int(len(self.mapping(source)[1])), "value_kind": source.value_kind}

    def params(self) -> dict:
        return {"panel": self.panel.name, "panel_sha256": self.panel.sha256, "panel_size": len(self.panel),
                "normalisation": "log1p(counts / cell_total * 1e4)"}
