"""``scdrugmap serve``: parsing and printing only; the app is :mod:`scdrugmap.serve.app`."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import store_option
from .errors import UserError


@click.command()
@store_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but 127.0.0.1 makes the app reachable from other machines "
                   "(no login): a warning is printed.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--allow-writes", is_flag=True,
              help="Allow uploads, extraction, predictions and probe runs (default: read-only pages).")
@click.option("--max-upload-mb", default=2000, show_default=True, type=click.IntRange(1),
              help="Largest upload accepted, in MB.")
@click.option("--upload-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder that keeps uploaded files (ingest records them as the datasets' sources; "
                   "default: <store>.uploads beside the store).")
def serve(store_path, host, port, allow_writes, max_upload_mb, upload_dir):
    """A local web app over the store: datasets, SQL, leaderboard, runs; upload, predict, train.

    Pages: the datasets and their cells by label, sample and patient; a read-only SQL box
    (the rules of 'scdrugmap query') with CSV download; the leaderboard with filters and
    bootstrap intervals, and each run's splits and figures. With --allow-writes: upload an
    .h5ad or a CSV/TSV (cell barcode, condition column, gene columns), checked as 'scdrugmap
    ingest' checks it, embedded with the baselines and predicted with a saved model (per-cell
    and per-patient calls, CSV download), and probe runs; long work runs in the background
    with its progress in the page. Stop with Ctrl+C.

    \b
    Examples:
      scdrugmap serve --store st                       # read-only, http://127.0.0.1:8000
      scdrugmap serve --store st --allow-writes --port 8080
      scdrugmap serve --store st --host 0.0.0.0        # other machines too (warns)
    """
    from .serve import require_dependencies

    require_dependencies()
    from .serve.server import run_server

    if isinstance(store_path, str):
        raise UserError(f"{store_path} is a URL: serve a local store (download it with 'scdrugmap store unpack')")
    run_server(store_path, host, port, allow_writes, max_upload_mb, upload_dir)
