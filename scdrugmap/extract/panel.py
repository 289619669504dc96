"""A fixed gene panel: the shared feature space of the baseline backbones.

Every dataset is mapped onto the same ordered gene list (genes a dataset lacks are zero),
so that baseline embeddings of different datasets are comparable and a probe can be
trained on one dataset and tested on another. The default panel is the 978 LINCS L1000
landmark genes (Subramanian et al. 2017; see ``panels/README.md``), chosen because they
were selected to summarise the transcriptome's response to perturbations, drugs included.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import UserError

DEFAULT_PANEL = "l1000"
TARGET_SUM = 1e4  # counts per 10,000, as scanpy's normalize_total(target_sum=1e4)


@dataclass(frozen=True)
class Panel:
    name: str
    symbols: tuple[str, ...]
    aliases: dict          # alias symbol -> index (older names of the same gene)
    sha256: str
    entrez: dict = field(default_factory=dict)   # NCBI Gene (Entrez) ID -> index, where the panel lists them

    def __len__(self) -> int:
        return len(self.symbols)


def load_panel(spec: str = DEFAULT_PANEL) -> Panel:
    """``l1000`` or the path of a text/TSV file with one gene symbol per line (first column)."""
    if spec == DEFAULT_PANEL:
        text = resources.files("scdrugmap.extract").joinpath("panels/l1000_landmark.tsv").read_text()
        name = DEFAULT_PANEL
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"gene panel {spec!r} is neither 'l1000' nor a readable file of gene symbols")
        text = path.read_text()
        name = path.name
    lines = [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    entrez_col = None
    if lines and lines[0][0].lower() == "symbol":
        header = [h.strip().lower() for h in lines[0]]
        entrez_col = header.index("entrez_id") if "entrez_id" in header else None
        lines = lines[1:]
    symbols = tuple(line[0].strip().upper() for line in lines)
    if len(set(symbols)) != len(symbols) or not symbols:
        raise UserError(f"gene panel {spec!r} is empty or lists a gene twice: give unique symbols")
    aliases = {line[2].strip().upper(): i for i, line in enumerate(lines) if len(line) > 2 and line[2].strip()}
    entrez = {}
    if entrez_col is not None:
        entrez = {int(line[entrez_col]): i for i, line in enumerate(lines)
                  if len(line) > entrez_col and line[entrez_col].strip().isdigit()}
    return Panel(name, symbols, aliases, hashlib.sha256("\n".join(symbols).encode()).hexdigest(), entrez)


def panel_columns(panel: Panel, symbols: np.ndarray, entrez: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(source column, panel index) pairs for the panel genes a dataset has (first match wins).

    With ``entrez`` (the dataset's NCBI Gene IDs) a gene is matched on its ID where the panel
    lists IDs, so symbols renamed since the panel was made still match; else on its symbol.
    """
    where = {s: i for i, s in enumerate(panel.symbols)}
    src_cols, dst = [], []
    seen = set()
    for col, sym in enumerate(np.char.upper(symbols.astype(str))):
        idx = panel.entrez.get(int(entrez[col])) if entrez is not None else None
        if idx is None:
            idx = where.get(sym, panel.aliases.get(sym))
        if idx is not None and idx not in seen:
            seen.add(idx)
            src_cols.append(col)
            dst.append(idx)
    return np.asarray(src_cols, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def panel_features(block: sp.csr_matrix, src_cols: np.ndarray, dst: np.ndarray, n_panel: int,
                   value_kind: str) -> np.ndarray:
    """log1p of counts per 10,000 (the cell total taken over *all* its genes) on the panel genes;
    normalized values get log1p, log1p and scaled values are used as given."""
    block = sp.csr_matrix(block, dtype=np.float64)
    if value_kind == "counts":
        totals = np.asarray(block.sum(axis=1)).ravel()
        scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        values = sp.diags(scale) @ block[:, src_cols]
        values = values.toarray()
        np.log1p(values, out=values)
    elif value_kind == "normalized":
        values = np.log1p(block[:, src_cols].toarray())
    else:  # log1p: already transformed; scaled (z-scored): used as given
        values = block[:, src_cols].toarray()
    out = np.zeros((block.shape[0], n_panel), dtype=np.float32)
    out[:, dst] = values
    return out

