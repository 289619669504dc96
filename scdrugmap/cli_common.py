"""What every ``scdrugmap`` command module shares: the store option, tables, seeds, one-line errors.

Imports only click at module level, so ``scdrugmap --help`` starts without numpy, pandas,
DuckDB or Zarr; each command imports what it needs when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import UserError

STORE_HELP = ("Store directory, or a read-only store URL (s3://bucket/prefix, https://host/path); "
              "or set SCDRUGMAP_STORE.")
VERBOSE = "scdrugmap.verbose"          # ctx.meta: the stores whose bytes read --verbose prints
# Seeds go to numpy and scikit-learn, which take 0 <= seed < 2**32.
SEED = click.IntRange(0, 2**32 - 1)


class Main(click.Group):
    """Turns user errors into one line on stderr and exit code 2 (no traceback): a
    :class:`UserError` (also a full or read-only disk), and click's usage errors."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            hint = ""
            if isinstance(e, click.UsageError) and e.ctx is not None:
                path = " ".join(["scdrugmap", *e.ctx.command_path.split()[1:]])
                hint = f" (see '{path} --help')"
            click.echo(f"Error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
        except UserError as e:
            click.echo(f"Error: {' '.join(str(e).split())}", err=True)
            sys.exit(e.exit_code)
        for store in ctx.meta.get(VERBOSE) or []:
            click.echo(store.io_summary(), err=True)
        return result


class StoreLocation(click.ParamType):
    """A store directory (a Path) or a store URL (kept as a string: a Path would mangle '//')."""

    name = "DIR|URL"

    def convert(self, value, param, ctx):
        from .store.common import is_url, local_path

        if isinstance(value, Path):
            return value
        return str(value) if is_url(str(value)) else local_path(str(value))


def store_option(f):
    return click.option("--store", "store_path", envvar="SCDRUGMAP_STORE", required=True,
                        type=StoreLocation(), help=STORE_HELP)(f)


def verbose_option(f):
    """--verbose: after the command, print the bytes read from the store (index download, chunks)."""
    def remember(ctx, param, value):
        if value:
            ctx.meta.setdefault(VERBOSE, [])
        return value

    return click.option("--verbose", is_flag=True, expose_value=False, callback=remember,
                        help="Also print the bytes read from the store (index download and embedding chunks).")(f)


def open_store(path):
    from .store.store import Store

    store = Store.open(path)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and VERBOSE in ctx.meta:
        ctx.meta[VERBOSE].append(store)
    return store


def parse_options(pairs, flag: str = "--option") -> dict:
    """``NAME=VALUE`` pairs as a dict."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"{flag} {pair!r} must be NAME=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def output_options(f=None, *, csv_help: str | None = None, json_help: str | None = None):
    """``--csv FILE`` and ``--json``, shared by the commands that print a table (see
    :func:`emit_table`); ``@output_options`` or ``@output_options(csv_help=..., json_help=...)``."""
    def decorate(f):
        f = click.option("--json", "as_json", is_flag=True,
                         help=json_help or "Print the rows as JSON on stdout instead of the table (full "
                                           "precision; notes stay on stderr).")(f)
        return click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
                            help=csv_help or "Also write every row to this CSV file (full precision).")(f)

    return decorate(f) if f is not None else decorate


def check_output_file(path: Path | None) -> None:
    """A one-line error now, before any work, when ``path`` cannot be written (a command that
    stores results checks its ``--csv`` first, so a bad path leaves the store as it was)."""
    import tempfile

    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder: give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist: create it first, or give another "
                        "file path")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".scdrugmap-check-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}: give a writable file path") from None


def save_csv(frame, csv_path: Path | None) -> None:
    """Every row of ``frame`` to ``csv_path`` (full precision), when one is given."""
    if csv_path is None:
        return
    try:
        frame.to_csv(csv_path, index=False)
    except OSError as e:
        raise UserError(f"cannot write {csv_path}: {e.strerror or e}: give a writable file path") from None


def print_json(frame) -> None:
    """The rows of ``frame`` as a JSON list of objects on stdout (NaN as null, dates as ISO text)."""
    import json
    import math

    def plain(value):
        if hasattr(value, "item") and not isinstance(value, (list, tuple)):
            value = value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if hasattr(value, "isoformat"):
            return value.isoformat()
        return value

    rows = [{str(k): plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
    click.echo(json.dumps(rows, indent=1, default=str))


def emit_table(frame, title: str | None = None, csv_path: Path | None = None, as_json: bool = False,
               table=None) -> None:
    """What ``--csv`` / ``--json`` ask for: all rows to ``csv_path``; then the rows as JSON, or
    else a table (``table``, a frame to print instead of ``frame``, e.g. formatted for reading)."""
    save_csv(frame, csv_path)
    if as_json:
        print_json(frame)
    else:
        print_table(frame if table is None else table, title=title)


def echo_notes(notes) -> None:
    """Each distinct note once, on stderr, in the order first given."""
    for note in dict.fromkeys(n for n in notes if n):
        click.echo(f"note: {note}", err=True)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def table_width() -> int | None:
    """The width tables are laid out in: on a terminal its width (``COLUMNS`` when set, as
    ``shutil.get_terminal_size`` reads it); elsewhere (a pipe, a file, a log) None: as wide as the
    table needs, so every cell stays whole on its row, whatever ``COLUMNS`` says."""
    import shutil

    if stdout_is_terminal():
        return shutil.get_terminal_size((120, 24)).columns
    return None


def print_table(frame, title: str | None = None, floatfmt: str = "{:.3f}") -> None:
    """A readable table on stdout (rich). On a terminal it fits the terminal's width, long cells
    folded onto more lines (never cut); elsewhere it is as wide as it needs (see :func:`table_width`)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False, header_style="bold")
    for col in frame.columns:
        table.add_column(str(col), justify="right" if frame[col].dtype.kind in "iuf" else "left",
                         overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*[_cell(v, floatfmt) for v in row])
    width = table_width()
    console = Console(width=width or 1_000_000)
    if title:                       # above the table, not its title: a long one wraps instead of being cut
        console.print(title, style="italic", markup=False, highlight=False)
    console.print(table)


def _cell(value, floatfmt: str) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return floatfmt.format(value)
    return str(value)
