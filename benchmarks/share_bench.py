"""Sharing benchmarks on a simulated store of the paper's size (326,751 cells, 36 datasets, hvg + pca).

1. ``store pack`` throughput (MB of store per second) into a directory, a ``.tar`` and a
   ``.tar.zst`` (zstd levels 1 and 3), the size of each pack, and ``store verify`` throughput.
   This is how the plain ``.tar`` default and the zstd level were chosen.
2. A remote probe: the store served by a plain HTTP server on 127.0.0.1, opened by URL, and an
   ``lr`` pooled probe on ``pca`` and on ``hvg`` of a 10% cohort (whole datasets: the cancer type
   closest to 10% of the cells) and of a scattered 10% (every tenth cell by a hash of its name);
   bytes read (index download + chunks, as counted by the store and by the server) against the
   backbone's arrays and the whole store, and the probe's time against the same probe on the
   local store.

Run: ``python benchmarks/share_bench.py [--scale 1.0] [--repeat 2]``. The store is built once
(simulate -> ingest -> extract) and cached in ``.bench/``; packs are written beside it and removed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import CACHE, machine, paper_store

from scdrugmap.probe.run import run_probe
from scdrugmap.store import pack as P
from scdrugmap.store.store import Store


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def best_of(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        while chunk := source.read(1 << 20):
            outputfile.write(chunk)
            self.server.bytes_sent += len(chunk)


def serve(directory: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(CountingHandler, directory=str(directory)))
    server.bytes_sent = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=2, help="best of N for pack and verify")
    args = ap.parse_args()

    store = paper_store(scale=args.scale)
    n_cells = int(store.sql("SELECT count(*) n FROM cells")["n"][0])
    work = Path(tempfile.mkdtemp(prefix="share-", dir=CACHE))
    try:
        P.pack(store.path, work / "probe-size")            # what a pack holds (no staging, no orphans)
        size = P.read_manifest(work / "probe-size")["total_bytes"]
        shutil.rmtree(work / "probe-size")
        print(f"machine: {machine()}")
        print(f"store: {n_cells:,} cells, {len(store.dataset_names())} datasets, backbones "
              f"{', '.join(store.extracted_backbones())}; {size / 1e6:,.1f} MB in the pack "
              f"(index {store.index_path.stat().st_size / 1e6:.1f} MB)\n")

        # ---- 1. pack and verify -----------------------------------------------------------
        print(f"1. pack and verify (best of {args.repeat}, warm page cache)")
        print("| pack | pack MB/s | pack size (MB) | ratio | verify MB/s | unpack MB/s |")
        print("|---|---|---|---|---|---|")
        for name, out, level in (("directory", "pack-dir", None), (".tar", "pack.tar", None),
                                 (".tar.zst level 1", "pack1.tar.zst", 1), (".tar.zst level 3", "pack3.tar.zst", 3)):
            target = work / out

            def do_pack():
                if target.exists():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                return P.pack(store.path, target, zstd_level=level or P.ZSTD_LEVEL)

            secs, report = best_of(do_pack, args.repeat)
            vsecs, v = best_of(lambda: P.verify(target), args.repeat)
            assert v.ok, v.summary()
            dest = work / "unpacked"
            t = time.perf_counter()
            P.unpack(target, dest)
            usecs = time.perf_counter() - t
            shutil.rmtree(dest)
            out_bytes = dir_bytes(target) if target.is_dir() else target.stat().st_size
            print(f"| {name} | {size / 1e6 / secs:,.0f} | {out_bytes / 1e6:,.1f} | {out_bytes / size:.2f} | "
                  f"{size / 1e6 / vsecs:,.0f} | {size / 1e6 / usecs:,.0f} |")
            shutil.rmtree(target) if target.is_dir() else target.unlink()

        # ---- 2. remote probe over HTTP --------------------------------------------------------
        print("\n2. remote probe over HTTP (127.0.0.1, http.server): lr head, pooled 5-fold, cold index cache")
        by_type = store.sql("SELECT cancer_type, count(*) n FROM cohort GROUP BY 1")
        by_type["share"] = by_type["n"] / n_cells
        pick = by_type.iloc[(by_type["share"] - 0.10).abs().argsort().iloc[0]]
        cohorts = {f"cancer_type = '{pick['cancer_type']}'": "10% by datasets",
                   "hash(obs_name) % 10 = 0": "10% scattered"}
        server = serve(store.path)
        url = f"http://127.0.0.1:{server.server_port}"
        print(f"store {size / 1e6:,.1f} MB, index {store.index_path.stat().st_size / 1e6:.1f} MB")
        print("| backbone | cohort | cells | index download (MB) | chunks read (MB) | chunks / backbone's arrays | "
              "total read / store | server sent (MB) | probe s, remote | probe s, local |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
        scratch = work / "local"                            # the local probe stores its run here
        scratch.mkdir()
        shutil.copy(store.index_path, scratch / "index.duckdb")
        (scratch / "embeddings.zarr").symlink_to(store.embeddings_path.resolve())
        local = Store.open(scratch)
        for backbone in ("pca", "hvg"):
            arrays_bytes = sum(store.array_nbytes(r) for r in store.provenance(backbone)["array_path"])
            dim = int(store.provenance(backbone)["dim"][0])
            for where, label in cohorts.items():
                shutil.rmtree(cache, ignore_errors=True)   # a cold cache: the index is downloaded
                sent0 = server.bytes_sent
                t = time.perf_counter()
                remote = Store.open(url, cache_dir=cache)
                run = run_probe(remote, backbone, head="lr", protocol="pooled", where=where, show_progress=False)
                rsecs = time.perf_counter() - t
                t = time.perf_counter()
                run_probe(local, backbone, head="lr", protocol="pooled", where=where, show_progress=False)
                lsecs = time.perf_counter() - t
                io = remote.io
                print(f"| {backbone} ({dim}-d, {arrays_bytes / 1e6:,.1f} MB) | {label} (`{where}`) | "
                      f"{run.n_cells:,} | {io.index_bytes / 1e6:.1f} | {io.chunk_bytes / 1e6:.2f} | "
                      f"{io.chunk_bytes / arrays_bytes:.1%} | {io.total / size:.1%} | "
                      f"{(server.bytes_sent - sent0) / 1e6:.1f} | {rsecs:.1f} | {lsecs:.1f} |")
        server.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
