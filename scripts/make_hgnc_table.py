"""Build scdrugmap/store/genes/hgnc_entrez.tsv.gz from an HGNC gene table.

Usage:
    python scripts/make_hgnc_table.py HGNC_TABLE.tsv [--source TEXT] [--date TEXT] [--out PATH]

HGNC_TABLE.tsv is a tab-separated HGNC download (the "complete set" or a custom download) with
the columns "HGNC ID", "Approved symbol" (or "symbol"), "Status" (optional), "NCBI Gene ID..."
(or "entrez_id") and "Ensembl gene ID" / "Ensembl ID..." (or "ensembl_gene_id"). It keeps the
approved genes that have an NCBI Gene (Entrez) ID and writes three columns, sorted by Entrez ID:
entrez_id, symbol, ensembl_gene_id (empty where HGNC lists none). The header lines record the
source, its date, its sha256 and the licence (HGNC data is CC0). The gzip stream carries no
time stamp, so the same input always gives the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "scdrugmap" / "store" / "genes" / "hgnc_entrez.tsv.gz"


def _column(header: list[str], *starts: str) -> int:
    low = [h.strip().lower() for h in header]
    for s in starts:
        for i, h in enumerate(low):
            if h == s or h.startswith(s):
                return i
    sys.exit(f"no column starting with any of {starts} in the header {header}")


def build(path: Path) -> list[tuple[int, str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[0], rows[1:]
    c_sym = _column(header, "approved symbol", "symbol")
    c_eg = _column(header, "ncbi gene id", "entrez_id", "entrez gene id")
    c_ens = _column(header, "ensembl gene id", "ensembl id", "ensembl_gene_id")
    low = [h.strip().lower() for h in header]
    c_status = low.index("status") if "status" in low else None
    out: dict[int, tuple[int, str, str]] = {}
    for r in body:
        if c_status is not None and r[c_status].strip() != "Approved":
            continue
        eg = r[c_eg].strip()
        if not eg:
            continue
        if not eg.isdigit():
            sys.exit(f"non-numeric Entrez ID {eg!r} for {r[c_sym]!r}")
        key = int(eg)
        if key in out:
            sys.exit(f"Entrez ID {key} is listed for two approved genes: {out[key][1]} and {r[c_sym]}")
        out[key] = (key, r[c_sym].strip(), r[c_ens].strip())
    symbols = [v[1] for v in out.values()]
    if len(set(symbols)) != len(symbols):
        sys.exit("an approved symbol is listed twice")
    return sorted(out.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", type=Path, help="the HGNC table (TSV)")
    ap.add_argument("--source", default="HGNC complete set", help="where the table came from (recorded)")
    ap.add_argument("--date", default="unknown", help="the HGNC release date of the table (recorded)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    sha = hashlib.sha256(args.table.read_bytes()).hexdigest()
    rows = build(args.table)
    text = io.StringIO()
    text.write("# HGNC approved human genes with an NCBI Gene (Entrez) ID: entrez_id -> symbol, Ensembl gene ID\n")
    text.write(f"# source: {args.source}\n")
    text.write(f"# hgnc_date: {args.date}\n")
    text.write(f"# source_sha256: {sha}\n")
    text.write("# licence: CC0 1.0 (HGNC data, https://www.genenames.org/about/license/)\n")
    text.write(f"# genes: {len(rows)}\n")
    text.write("entrez_id\tsymbol\tensembl_gene_id\n")
    for eg, sym, ens in rows:
        text.write(f"{eg}\t{sym}\t{ens}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(text.getvalue().encode("utf-8"))
    print(f"{len(rows)} genes -> {args.out} ({args.out.stat().st_size:,} bytes); source sha256 {sha}")


if __name__ == "__main__":
    main()
