"""Store benchmarks on a simulated store of the paper's size (326,751 cells, 36 datasets).

1. Loading a SQL-selected 50% of one backbone's embeddings (``label = 'resistant'``,
   163,794 cells) through ``Store.load``, in GB/s of decoded embedding, against ``np.load``
   of the same bytes from one ``.npy`` file; the same for a few Zarr chunk sizes, which is
   how the default chunk size was chosen.
3. Store size per million cells for float16 vs float32, and the F1 difference between
   them (same splits, same head).

Run: ``python benchmarks/store_bench.py [--scale 1.0] [--backbone hvg]``. The store is built
once (through the real simulate -> ingest -> extract path) and cached in ``.bench/``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine, paper_store

from scdrugmap.probe.evaluate import evaluate
from scdrugmap.probe.splits import pooled_splits
from scdrugmap.store import arrays


@contextlib.contextmanager
def zarr_path():
    """Read every array through zarr, as before the direct local reader."""
    saved = arrays._local_layout
    arrays._local_layout = lambda array: None
    try:
        yield
    finally:
        arrays._local_layout = saved


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rechunk(store, backbone: str, out: Path, chunk_rows: int, dtype: str) -> Path:
    """A copy of the backbone's arrays with another chunk size / dtype (values from the float32 source)."""

    prov = store.provenance(backbone)
    for _, row in prov.iterrows():
        src = arrays.open_array(store.embeddings_path, row["array_path"])
        dst = arrays.create_array(out / row["array_path"], shape=src.shape, chunks=(chunk_rows, src.shape[1]),
                                  dtype=dtype)
        dst[:] = src[:].astype(dtype)
    return out


def load_selection(store, root: Path, backbone: str, cells) -> np.ndarray:
    prov = store.provenance(backbone).set_index("dataset")
    parts = []
    for dataset, group in cells.groupby("dataset", sort=False):
        parts.append(arrays.read_rows(arrays.open_array(root, prov.loc[dataset, "array_path"]), group["row"].to_numpy()))
    return np.concatenate(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--backbone", default="hvg")
    ap.add_argument("--f1-backbone", default="pca", help="backbone of the float16-vs-float32 F1 comparison")
    args = ap.parse_args()

    store = paper_store(scale=args.scale)
    n_cells = int(store.sql("SELECT count(*) n FROM cells")["n"][0])
    print(f"machine: {machine()}")
    print(f"store: {n_cells:,} cells, {len(store.dataset_names())} datasets; backbone {args.backbone}\n")

    # ---- 1. SQL-selected 50% load vs np.load --------------------------------------------
    where = "label = 'resistant'"
    tmp = Path(tempfile.mkdtemp(prefix="scdrugmap-bench-"))
    try:
        secs, (X, cells) = best_of(lambda: store.load(args.backbone, where=where))
        gb, stored_dtype = X.nbytes / 1e9, str(X.dtype)
        np.save(tmp / "same.npy", X)
        npy_secs, _ = best_of(lambda: np.load(tmp / "same.npy"))
        print("1. load a SQL-selected 50% (WHERE label = 'resistant'), warm page cache, best of 3")
        print(f"   {len(cells):,} cells x {X.shape[1]} {X.dtype} = {gb:.3f} GB; the rows are scattered, so every "
              "chunk is read")
        print("   where the time goes:")
        sql_all, _ = best_of(lambda: store.cells(where))
        sql_min, few = best_of(lambda: store.cells(where, columns=["label"]))
        prov = store._embedding_rows(args.backbone, few)
        decode, _ = best_of(lambda: store._read_embeddings(prov, few, None))
        with zarr_path():
            decode_zarr, _ = best_of(lambda: store._read_embeddings(prov, few, None))
        print(f"     SQL selection, all {cells.shape[1]} cohort columns to pandas  {sql_all:6.3f} s")
        print(f"     SQL selection, dataset + row + label                 {sql_min:6.3f} s")
        print(f"     chunks: read, CRC-32C, decode, gather (direct)       {decode:6.3f} s")
        print(f"     chunks: the same through zarr (before)               {decode_zarr:6.3f} s")
        few_secs, _ = best_of(lambda: store.load(args.backbone, where=where, columns=["label"]))
        with zarr_path():
            before, _ = best_of(lambda: store.load(args.backbone, where=where))
        print("   whole loads:")
        for name, t in (("Store.load (all cohort columns)", secs), ("Store.load(columns=['label'])", few_secs),
                        ("Store.load before (zarr, all columns)", before), ("np.load of the same bytes", npy_secs)):
            print(f"     {name:<40} {t:6.3f} s  {gb / t:6.2f} GB/s  {npy_secs / t:6.1%} of np.load")
        del X
        full, (Xa, _) = best_of(lambda: store.load(args.backbone, columns=["label"]))
        np.save(tmp / "all.npy", Xa)
        npy_full, _ = best_of(lambda: np.load(tmp / "all.npy"))
        with zarr_path():
            full_before, _ = best_of(lambda: store.load(args.backbone))
        gb_all = Xa.nbytes / 1e9
        print(f"   whole array ({len(Xa):,} cells, {gb_all:.3f} GB):")
        for name, t in (("Store.load(columns=['label'])", full), ("Store.load before (zarr, all columns)",
                                                                   full_before), ("np.load", npy_full)):
            print(f"     {name:<40} {t:6.3f} s  {gb_all / t:6.2f} GB/s  {npy_full / t:6.1%} of np.load")
        del Xa
        print()

        print("   chunk size (rows)   read 50% (s)   GB/s   size on disk (MB)")
        for chunk_rows in (1024, 4096, 16384, 65536):
            root = rechunk(store, args.backbone, tmp / f"c{chunk_rows}", chunk_rows, stored_dtype)
            s, _ = best_of(lambda: load_selection(store, root, args.backbone, cells))
            print(f"   {chunk_rows:>17,}   {s:12.3f}   {gb / s:4.2f}   {dir_bytes(root) / 1e6:14.1f}")
            shutil.rmtree(root)

        # ---- 3. size per million cells, float16 vs float32; F1 difference ---------------
        print("\n3. store size per million cells and F1, float16 vs float32")
        for backbone in dict.fromkeys([args.backbone, args.f1_backbone]):
            dim = int(store.provenance(backbone)["dim"][0])
            sizes = {}
            for dtype in ("float16", "float32"):
                root = rechunk(store, backbone, tmp / dtype, arrays.DEFAULT_CHUNK_ROWS, dtype)
                sizes[dtype] = dir_bytes(root) / n_cells * 1e6 / 1e9
                shutil.rmtree(root)
            print(f"   {backbone} ({dim}-d): float16 {sizes['float16']:.3f} GB / M cells, "
                  f"float32 {sizes['float32']:.3f} GB / M cells (ratio {sizes['float32'] / sizes['float16']:.2f})")
        # F1: the float32 embedding is not stored, so recompute it exactly from the store's
        # own pca fit; float16 is the stored array. Same splits, same head, same seed.
        X16, cells = store.load(args.f1_backbone, dtype=np.float32)
        X32 = float32_reference(store, args.f1_backbone, cells)
        y = (cells["label"] == "resistant").to_numpy().astype(int)
        splits = pooled_splits(y, cells["patient"].to_numpy(), n_splits=5, seed=0)
        for head in ("lr", "lgbm"):
            f = {}
            for name, Xd in (("float16", X16), ("float32", X32)):
                rec = evaluate(Xd, y, splits, head, seed=0, n_jobs=2)
                f[name] = np.mean([r["metrics"]["f1"] for r in rec if r["metrics"]])
            print(f"   {args.f1_backbone} + {head}, pooled 5-fold by patient: F1 float16 {f['float16']:.4f}, "
                  f"float32 {f['float32']:.4f}, difference {f['float16'] - f['float32']:+.4f}")
        print(f"   max |float16 - float32| over all embedding values: {np.abs(X16 - X32).max():.4f} "
              f"(values up to {np.abs(X32).max():.1f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def float32_reference(store, backbone, cells) -> np.ndarray:
    """Re-extract ``backbone`` in float32 into a scratch copy of the index and load it."""
    from scdrugmap.extract.runner import extract
    from scdrugmap.store.store import Store

    scratch = Path(tempfile.mkdtemp(prefix="scdrugmap-f32-"))
    try:
        shutil.copy(store.index_path, scratch / "index.duckdb")
        (scratch / "embeddings.zarr").mkdir()
        if (store.path / "models").exists():
            shutil.copytree(store.path / "models", scratch / "models")
        copy = Store.open(scratch)
        extract(copy, backbone, force=True, dtype="float32", show_progress=False)
        X, c = copy.load(backbone)
        assert (c["obs_name"].to_numpy() == cells["obs_name"].to_numpy()).all()
        return X
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
