"""NCBI Gene (Entrez) IDs as gene identifiers: detecting them and mapping them to HGNC symbols
and Ensembl gene IDs through the table shipped in ``genes/hgnc_entrez.tsv.gz`` (HGNC, CC0; its
source, date and sha256 are in the file's header and ``genes/README.md``).

Backbones work on symbols (panels, most vocabularies) or Ensembl IDs (Geneformer, CellPLM), so
a dataset whose genes are Entrez IDs is given both through this table. An ID the table lacks
keeps its number as its "symbol" and has no Ensembl ID: no panel or vocabulary lists it, so
symbol- and Ensembl-based backbones leave it out, as they do any unknown symbol.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from ..errors import UserError

TABLE = "genes/hgnc_entrez.tsv.gz"
MIN_MAPPED = 0.5          # share of the Entrez IDs the table must know, or ingest refuses the file


@dataclass(frozen=True)
class EntrezTable:
    symbols: dict          # Entrez ID (int) -> HGNC approved symbol
    ensembl: dict          # Entrez ID (int) -> Ensembl gene ID ('' where HGNC lists none)
    meta: dict             # header fields: source, hgnc_date, source_sha256, licence, genes

    def __len__(self) -> int:
        return len(self.symbols)


@lru_cache(maxsize=1)
def load_table() -> EntrezTable:
    raw = resources.files("scdrugmap.store").joinpath(TABLE).read_bytes()
    symbols, ensembl, meta = {}, {}, {}
    lines = gzip.decompress(raw).decode("utf-8").splitlines()
    for line in lines:
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            if value:
                meta[key.strip()] = value.strip()
            continue
        eg, sym, ens = line.split("\t")
        if eg == "entrez_id":
            continue
        symbols[int(eg)] = sym
        ensembl[int(eg)] = ens
    return EntrezTable(symbols, ensembl, meta)


def as_entrez(names) -> np.ndarray | None:
    """``names`` as positive integers when every one is one (ints, or strings of digits), else None."""
    values = list(names)
    if not values:
        return None
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            n = int(v)
        else:
            s = str(v).strip()
            if not s.isascii() or not s.isdigit() or len(s) > 12:
                return None
            n = int(s)
        if n <= 0:
            return None
        out[i] = n
    return out


def check_entrez(ids: np.ndarray, where: str = "var_names") -> tuple[int, str | None]:
    """(how many of ``ids`` the table knows, a note when some are unknown); refuses too few."""
    table = load_table()
    n = len(ids)
    if n > 1 and np.array_equal(np.sort(ids), np.arange(1, n + 1)):
        raise UserError(f"the gene identifiers in {where} are the numbers 1..{n}, row numbers rather than "
                        "gene IDs: set var_names to gene symbols, Ensembl IDs or NCBI Gene (Entrez) IDs")
    known = sum(1 for i in ids.tolist() if i in table.symbols)
    date = table.meta.get("hgnc_date", "unknown").split(" ")[0]
    if known < MIN_MAPPED * n:
        raise UserError(f"the gene identifiers in {where} are integers, but only {known:,} of {n:,} are "
                        f"NCBI Gene (Entrez) IDs of human genes in the HGNC table ({date}), e.g. "
                        f"{[int(i) for i in ids[:3]]}: set var_names to human Entrez IDs, gene symbols or Ensembl IDs")
    note = None
    if known < n:
        note = (f"{known:,} of {n:,} Entrez IDs map to HGNC symbols ({date} table); the other {n - known:,} "
                "have no symbol or Ensembl ID there, so panels and backbones leave them out")
    return known, note


def entrez_symbols(ids: np.ndarray) -> np.ndarray:
    """HGNC symbols of ``ids`` (an unknown ID keeps its number, which no panel or vocabulary has)."""
    table = load_table().symbols
    return np.array([table.get(i, str(i)) for i in ids.tolist()], dtype=str)


def entrez_ensembl(ids: np.ndarray) -> np.ndarray:
    """Ensembl gene IDs of ``ids`` ('' where the table has none)."""
    table = load_table().ensembl
    return np.array([table.get(i, "") for i in ids.tolist()], dtype=str)
