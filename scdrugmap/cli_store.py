"""``scdrugmap store ...``, ``scdrugmap export`` and ``scdrugmap import-embeddings``: parsing and printing.

The work is in :mod:`scdrugmap.store.pack`, ``.merge``, ``.exchange`` and ``.info``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_common import (StoreLocation, open_store, output_options, parse_options, print_table, save_csv,
                         store_option, verbose_option)
from .errors import UserError


def _mb(n) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.2f} MB"


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _rate(n_bytes: int, seconds: float) -> str:
    return f"{n_bytes / 1e6 / seconds:,.0f} MB/s" if seconds > 0 else "n/a"


@click.group("store")
def store_group():
    """Share stores between labs: info, pack, verify, unpack, merge, migrate.

    \b
    A lab with a GPU extracts once and packs the store; a lab without one (no torch
    needed) verifies and unpacks it, or opens it read-only where it lies (s3://, https://),
    and re-analyses it with query, probe and export.

    \b
    Examples:
      scdrugmap store info st
      scdrugmap store pack st st.tar --strip-paths
      scdrugmap store verify st.tar
      scdrugmap store unpack st.tar received
      scdrugmap store merge lab_a lab_b --into both
      scdrugmap query --store https://host/st "SELECT * FROM datasets" --verbose
    """


# ---- info -----------------------------------------------------------------------------------
@store_group.command("info")
@click.argument("location", type=StoreLocation())
@output_options(json_help="Print everything as JSON (one object: datasets, backbones, sizes, leftovers).",
                csv_help="Also write the datasets table (one row per dataset, with the backbones that have "
                         "embeddings of it) to this CSV file.")
@verbose_option
def info(location, as_json, csv_path):
    """Datasets, cells, backbones (dims, dtypes, sizes, origin), results, schema version of a store.

    LOCATION is a store directory, a store URL, or a pack (.tar / .tar.zst: only its
    manifest is read).

    \b
    Examples:
      scdrugmap store info st
      scdrugmap store info st.tar
      scdrugmap store info s3://bucket/st --json
      scdrugmap store info st --csv datasets.csv
    """
    from .store.info import pack_info, store_info
    from .store.pack import read_manifest, source_kind

    if isinstance(location, Path) and location.is_file():
        data = pack_info(read_manifest(location), location, source_kind(location))
    else:
        data = store_info(open_store(location))
    save_csv(_datasets_frame(data), csv_path)
    if as_json:
        click.echo(json.dumps(data, indent=1, default=str))
        return
    _print_info(data)


def _datasets_frame(data: dict):
    """The datasets table of a ``store info`` dict (lists, e.g. its backbones, as 'a, b')."""
    import pandas as pd

    rows = [{k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in d.items()}
            for d in data["datasets"]]
    return pd.DataFrame(rows, columns=list(data["datasets"][0]) if data["datasets"] else ["dataset"])


def _print_info(data: dict) -> None:
    import pandas as pd

    if "kind" in data:
        click.echo(f"pack {data['location']} ({data['kind']}, format {data['format_version']}): store schema version "
                   f"{data['schema_version']} (this scdrugmap reads {data['reader_schema_version']}), packed by "
                   f"{data['packed_by']} at {data['packed_at']}"
                   + (", local paths stripped" if data["paths_stripped"] else ""))
        click.echo(f"{_n(len(data['datasets']), 'dataset')}, {data['cells'] or 0:,} cells, "
                   f"{_n(len(data['backbones']), 'backbone')}, {_n(data['probe_runs'] or 0, 'probe run')}; "
                   f"{data['files']:,} files, {_mb(data['bytes'])}")
    else:
        ro = ", read-only" if data["read_only"] else ""
        click.echo(f"store {data['location']}{ro}: schema version {data['schema_version']} (this scdrugmap reads "
                   f"{data['reader_schema_version']}), created by {data['created_by']} at {data['created_at']}"
                   + (f"; {', '.join(m.replace('_', ' ') for m in data['migrated'])}" if data["migrated"] else ""))
        b = data["bytes"]
        click.echo(f"{_n(len(data['datasets']), 'dataset')}, {data['cells']:,} cells, "
                   f"{_n(len(data['backbones']), 'backbone')}, {_n(data['probe_runs'], 'probe run')} "
                   f"({data['probe_results']:,} results), "
                   f"{data['zero_shot_cached_answers']:,} cached zero-shot answers")
        click.echo(f"size: index {_mb(b['index'])}, embeddings {_mb(b['embeddings'])}, models {_mb(b['models'])}, "
                   f"total {_mb(b['total'])}")
        _print_leftovers(data.get("reclaimable"))
        if data.get("pack_manifest"):
            m = data["pack_manifest"]
            click.echo(f"unpacked from a pack made at {m.get('created_at')} by scdrugmap {m.get('scdrugmap_version')} "
                       "('scdrugmap store verify' tells whether it changed since)")
    if data["datasets"]:
        print_table(_datasets_frame(data), title="Datasets")
    if data["backbones"]:
        frame = pd.DataFrame(data["backbones"])
        if "bytes" in frame:
            frame["size"] = frame.pop("bytes").map(_mb)
        print_table(frame, title="Backbones")


def _print_leftovers(left: dict | None) -> None:
    """What killed or failed commands left, and what reclaims it."""
    if not left:
        return
    for job in left["running_jobs"]:
        click.echo(f"running now: {job.replace('-', ' ', 1)}")
    for x in left["interrupted_extractions"]:
        state = "running" if x["running"] else "interrupted, resumed by the next extract of that backbone"
        click.echo(f"extraction in staging: {x['backbone']} x {x['dataset']}, {x['chunks_done']}/{x['chunks']} "
                   f"chunks, {_mb(x['bytes'])} ({state})")
    for x in left["unreferenced_arrays"]:
        click.echo(f"reclaimable: {x['path']}, {_mb(x['bytes'])}, an array no index row refers to (removed by the "
                   "next extract of that backbone)")
    for x in left["stale_work_folders"]:
        click.echo(f"reclaimable: {x['path']}, {_mb(x['bytes'])}, left by a killed command (removed by the next "
                   "command that builds that destination; or delete it)")
    if left["bytes"]:
        click.echo(f"reclaimable in all: {_mb(left['bytes'])}")


# ---- pack / verify / unpack -----------------------------------------------------------------
@store_group.command("pack")
@click.argument("store_dir", type=StoreLocation())
@click.argument("out", type=StoreLocation())
@click.option("--strip-paths", is_flag=True,
              help="Keep only the file names of local paths (datasets.source_path, paths in parameters).")
def pack(store_dir, out, strip_paths):
    """Pack STORE_DIR into OUT with a manifest (a sha256 per file) for another lab.

    OUT ending in .tar is one uncompressed archive, .tar.zst a zstd-compressed one; any other
    name is a directory (itself an openable store). Only the arrays the index refers to are
    packed (no extractions in progress); the index is a consistent snapshot.

    \b
    Examples:
      scdrugmap store pack st st.tar
      scdrugmap store pack st st.tar.zst --strip-paths
      scdrugmap store pack st shared/st-2025-06      # a directory
    """
    from .store.pack import pack as do_pack

    r = do_pack(store_dir, out, strip_paths=strip_paths)
    written = f" ({_mb(r.out_bytes)} written)" if r.kind == "tar.zst" else ""
    click.echo(f"packed {store_dir} into {r.out} ({r.kind}): {r.n_files:,} files, {_mb(r.n_bytes)}{written} in "
               f"{r.seconds:.1f} s ({_rate(r.n_bytes, r.seconds)}); schema version {r.manifest['schema_version']}"
               + ("; local paths stripped" if strip_paths else ""))
    click.echo(f"manifest sha256: {r.digest} (publish it apart from the pack; the receiver checks with "
               f"'scdrugmap store verify {r.out.name} --expect {r.digest}')")


@store_group.command("verify")
@click.argument("pack_path", metavar="PACK|DIR", type=StoreLocation())
@click.option("--expect", metavar="SHA256", help="The manifest digest the sender published ('store pack' prints "
                                                 "it): the pack must be exactly the one sent.")
def verify(pack_path, expect):
    """Check PACK (.tar, .tar.zst, a pack directory, or a store unpacked from one) against its
    manifest: any changed, missing or extra byte is found and the file named. A store that was
    never packed is checked by its own checksums: every index block, every embedding chunk
    (CRC-32C), every model file.

    Without --expect this finds damage, not tampering (a rewritten pack can carry a rewritten
    manifest); with the digest the sender published it also proves the pack is the one sent.

    \b
    Examples:
      scdrugmap store verify st.tar --expect 3f5c...   # the digest 'store pack' printed
      scdrugmap store verify received                  # still as it was unpacked?
      scdrugmap store verify my_store                  # a working store: recompute its checksums
    """
    from .store.pack import MANIFEST
    from .store.pack import verify as do_verify

    if isinstance(pack_path, Path) and pack_path.is_dir() and not (pack_path / MANIFEST).is_file():
        from .store.check import verify_store

        if expect:
            raise UserError(f"{pack_path} is a store, not a pack: --expect applies to packs (their manifest)")
        r = verify_store(pack_path)
        for note in r.notes:
            click.echo(f"note: {note}", err=True)
        if not r.ok:
            raise UserError(f"{pack_path} failed verification: {r.summary()}")
        click.echo(f"verified {pack_path}: {r.n_files:,} files, {_mb(r.n_bytes)}, every checksum matches (index "
                   f"blocks, embedding chunks, model files) [{r.seconds:.1f} s, {_rate(r.n_bytes, r.seconds)}]")
        return
    r = do_verify(pack_path, expect=expect)
    if not r.ok:
        raise UserError(f"{pack_path} failed verification: {r.summary()}")
    proof = "; the manifest is the one published (--expect)" if expect else ""
    click.echo(f"verified {pack_path}: {r.n_files:,} files, {_mb(r.n_bytes)}, all match the manifest (sha256) "
               f"[{r.seconds:.1f} s, {_rate(r.n_bytes, r.seconds)}]; manifest sha256 {r.digest}{proof}")


@store_group.command("unpack")
@click.argument("pack_path", metavar="PACK", type=StoreLocation())
@click.argument("dest", metavar="DIR", type=StoreLocation())
@click.option("--verbose", is_flag=True, help="Also print the pack's datasets and backbones.")
def unpack(pack_path, dest, verbose):
    """Verify PACK and unpack it into DIR (new or empty); a damaged pack writes nothing.

    \b
    Examples:
      scdrugmap store unpack st.tar received
      scdrugmap query --store received "SELECT * FROM datasets"
    """
    from .store.info import store_info
    from .store.pack import unpack as do_unpack

    r = do_unpack(pack_path, dest)
    migrated = f"; migrated: {', '.join(r.migrated)}" if r.migrated else ""
    click.echo(f"unpacked {pack_path} into {r.dest}: {r.n_files:,} files, {_mb(r.n_bytes)} verified in "
               f"{r.seconds:.1f} s{migrated}")
    if verbose:
        _print_info(store_info(open_store(r.dest)))


@store_group.command("merge")
@click.argument("a", type=StoreLocation())
@click.argument("b", type=StoreLocation())
@click.option("--into", "into", required=True, type=StoreLocation(), help="New store directory.")
@click.option("--prefer", type=click.Choice(["A", "B"], case_sensitive=False),
              help="On a conflict, keep this side's version (and drop the other's runs that used it).")
def merge(a, b, into, prefer):
    """Merge stores A and B into a new store: union of datasets, backbones and results.

    Embeddings are copied, never recomputed. The same dataset with a different source file
    (sha256) or ingest settings, or the same backbone x dataset with different provenance,
    is a conflict: all are listed, and nothing is written, unless --prefer A|B.

    \b
    Examples:
      scdrugmap store merge lab_a lab_b --into both
      scdrugmap store merge lab_a lab_b --into both --prefer B
    """
    from .store.merge import merge as do_merge

    r = do_merge(a, b, into, prefer=prefer)
    click.echo(f"merged {a} and {b} into {r.into}: {_n(len(r.datasets), 'dataset')}, "
               f"{_n(len(r.backbones), 'backbone')} ({', '.join(r.backbones) or 'none'}), "
               f"{_n(r.n_runs, 'probe run')}, {_n(len(r.models), 'model')} with {r.n_predictions:,} predictions "
               f"[{r.seconds:.1f} s]")
    for c in r.resolved:
        click.echo(f"conflict resolved for {prefer.upper()}: {c}")
    for run in r.dropped_runs:
        click.echo(f"dropped probe run {run}: it used a version that was not kept", err=True)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)


@store_group.command("migrate")
@click.argument("store_dir", type=StoreLocation())
def migrate(store_dir):
    """Bring a store made by an older scdrugmap to this version's schema (opening it does the same).

    \b
    Example:
      scdrugmap store migrate old_store
    """
    from .store.schema import SCHEMA_VERSION

    store = open_store(store_dir)
    if store.migrated:
        click.echo(f"migrated {store.location} to schema version {SCHEMA_VERSION}: "
                   + "; ".join(m.description for m in store.migrated))
    else:
        click.echo(f"{store.location} is at schema version {SCHEMA_VERSION}: nothing to do")


# ---- export / import ------------------------------------------------------------------------
@click.command("export")
@store_option
@click.option("--backbone", required=True, help="Backbone whose embeddings are exported.")
@click.option("--where", help="SQL condition on the cohort view selecting the cells (default: all).")
@click.option("--to", "to", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="FILE.h5ad (embedding in obsm['X_<backbone>'], cells in obs) or FILE.parquet (one row per cell).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@verbose_option
def export(store_path, backbone, where, to, force):
    """Export embeddings with their cells' metadata to .h5ad (AnnData) or .parquet.

    \b
    Examples:
      scdrugmap export --store st --backbone pca --to pca.h5ad
      scdrugmap export --store st --backbone hvg --where "cancer_type = 'Glioblastoma'" --to gbm.parquet
      scdrugmap export --store https://host/st --backbone pca --where "dataset = 'pc9'" --to pc9.h5ad --verbose
    """
    from .store.exchange import export as do_export

    r = do_export(open_store(store_path), backbone, to, where=where, overwrite=force)
    click.echo(f"exported {backbone}: {r.n_cells:,} cells x {r.dim} ({r.dtype}) to {r.path} ({r.format}, "
               f"{_mb(r.n_bytes)})")


@click.command("import-embeddings")
@store_option
@click.option("--dataset", required=True, help="Ingested dataset the embeddings belong to.")
@click.option("--backbone", required=True, help="Name to store them under (a new name, or one with --replace).")
@click.option("--from", "source", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="FILE.npy (cells x dims), FILE.h5ad (an obsm key) or FILE.parquet (a list column).")
@click.option("--cell-ids", type=click.Path(dir_okay=False, path_type=Path),
              help="Text file with the cell name of each row of FILE, one per line (needed to align a .npy "
                   "whose rows are not in store order).")
@click.option("--cell-col", help="obs column (.h5ad) or column (.parquet) with the cell names "
                                 "(default: obs_names / obs_name).")
@click.option("--key", help="obsm key (.h5ad) or list column (.parquet) of the embedding "
                            "(default: X_<backbone>, or the only one).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]),
              help="Storage dtype (default: the file's float16/float32; float32 for anything else).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A fact recorded in provenance params, e.g. --param model=scGPT-API (repeatable).")
@click.option("--replace", is_flag=True, help="Replace this backbone's embeddings of this dataset.")
def import_embeddings(store_path, dataset, backbone, source, cell_ids, cell_col, key, dtype, params, replace):
    """Bring embeddings computed elsewhere (another tool, a model's web API) into the store.

    Rows are aligned to the ingested cells by cell name; a wrong row count or unknown or
    repeated names are errors. Provenance records origin 'external' and the file's name,
    sha256, format and key. Without names (a bare .npy) rows must be in store order.

    \b
    Examples:
      scdrugmap import-embeddings --store st --dataset pc9 --backbone scvi --from scvi.h5ad --key X_scVI
      scdrugmap import-embeddings --store st --dataset pc9 --backbone api-emb --from emb.npy \\
          --cell-ids cells.txt --param model=some-web-api
      scdrugmap import-embeddings --store st --dataset gbm --backbone pca2 --from gbm.parquet
    """
    from .store.exchange import import_embeddings as do_import

    from .extract.registry import all_backbones

    store = open_store(store_path)
    r = do_import(store, dataset, backbone, source, key=key, cell_ids=cell_ids, cell_col=cell_col, dtype=dtype,
                  replace=replace, params=parse_options(params))
    how = "aligned by cell names" + (" (rows reordered)" if r.reordered else "") if r.aligned_by == "cell names" \
        else "rows taken in store order (no cell names given)"
    verb = "replaced" if r.replaced else "imported"
    click.echo(f"{verb} {r.backbone} · {r.dataset}: {r.n_cells:,} cells x {r.dim} ({r.dtype}), {how}; "
               "provenance origin: external")
    if backbone in all_backbones():           # after the import: a refusal stays one line
        click.echo(f"warning: {backbone!r} is the name of a built-in backbone: these embeddings are stored "
                   "and reported under it although scdrugmap did not compute them (provenance origin: external); "
                   f"prefer another --backbone name, e.g. {backbone}-external", err=True)
