"""Run scdrugmap commands on a store that lies on a full or a read-only disk, for real.

``run_on_small_disk`` starts this file inside a private mount namespace (``unshare``; no root
needed where user namespaces are allowed) with a small tmpfs mounted at a fresh folder. There
it copies the store onto the tmpfs, fills the disk up to ``free`` bytes (or remounts it
read-only), runs each command as its own process, and reports each exit code, stderr,
whether the store's files are byte for byte as before, and whether ``store verify`` passes
after it, as JSON on stdout. Nothing outside the
namespace sees the tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()


def _snapshot(path: Path) -> dict:
    import hashlib

    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def _rows(path: Path) -> dict:
    """Every table of the index, row for row (read-only: a pending write-ahead log is read, not applied)."""
    import duckdb

    index = path / "index.duckdb"
    if not index.exists():
        return {}
    con = duckdb.connect(str(index), read_only=True)
    try:
        tables = [t for (t,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
        return {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"').fetchall())) for t in tables}
    finally:
        con.close()


def _fill(mount: Path, free: int) -> None:
    st = os.statvfs(mount)
    left = st.f_bavail * st.f_frsize - free
    with open(mount / "filler", "wb") as f:
        block = b"\0" * (1 << 20)
        while left > 0:
            n = f.write(block[:min(left, len(block))])
            left -= n


def inside(spec: dict) -> dict:
    mount = Path(spec["mount"])
    st = mount / "st"
    shutil.copytree(spec["store"], st)
    if spec.get("readonly"):
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    else:
        _fill(mount, spec["free"])
    results = []
    for command in spec["commands"]:
        before, rows_before = _snapshot(st), _rows(st)
        args = [a.replace("{st}", str(st)).replace("{mnt}", str(mount)) for a in command]
        r = subprocess.run([sys.executable, "-m", "scdrugmap.cli", *args], capture_output=True, text=True,
                           cwd=spec["cwd"])
        others = sorted(p.name for p in mount.iterdir() if p.name not in ("st", "filler"))
        after, rows_after = _snapshot(st), _rows(st)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        check = subprocess.run([sys.executable, "-m", "scdrugmap.cli", "store", "verify", str(st)],
                               capture_output=True, text=True, cwd=spec["cwd"])
        results.append({"command": command, "rc": r.returncode, "stderr": r.stderr, "stdout": r.stdout,
                        "unchanged": not changed, "changed": changed,
                        "rows_unchanged": rows_before == rows_after, "wal_before": "index.duckdb.wal" in before, "other_files": others,
                        "verified": check.returncode == 0})
    return {"results": results}


def run_on_small_disk(store, commands, tmp_path, free: int = 0, readonly: bool = False, size_mb: int = 64):
    """The results of ``commands`` (argument lists; '{st}' is the store, '{mnt}' the disk) run on a
    ``size_mb`` tmpfs holding a copy of ``store``; None when no mount namespace can be made here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    mount = tmp_path / "disk"
    mount.mkdir()
    spec = {"mount": str(mount), "store": str(store), "commands": commands, "free": free, "readonly": readonly,
            "cwd": str(HERE.parents[2])}
    (tmp_path / "disk-spec.json").write_text(json.dumps(spec))
    script = (f"mount -t tmpfs -o size={size_mb}m tmpfs {mount} && "
              f"exec {sys.executable} {HERE} {tmp_path / 'disk-spec.json'}")
    r = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                       text=True)
    if r.returncode != 0 and "results" not in r.stdout:
        if "mount" in r.stderr or "unshare" in r.stderr or "Operation not permitted" in r.stderr:
            return None
        raise AssertionError(r.stderr)
    return json.loads(r.stdout)["results"]


if __name__ == "__main__":
    print(json.dumps(inside(json.loads(Path(sys.argv[1]).read_text()))))
