"""``scdrugmap store info``: what a store (or a pack) holds, as one JSON-ready dict."""

from __future__ import annotations

import json
from pathlib import Path

from .._version import __version__
from .schema import SCHEMA_VERSION
from .cleanup import reclaimable
from .store import Store


def _short(value) -> str | None:
    return str(value)[:12] if value else None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def store_info(store: Store) -> dict:
    """Datasets, backbones (dims, dtypes, sizes, provenance), results and sizes of an open store."""
    with store.connect() as con:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        n_runs = con.execute("SELECT count(*) FROM probe_runs").fetchone()[0]
        n_results = con.execute("SELECT count(*) FROM probe_results").fetchone()[0]
        n_cached = con.execute("SELECT count(*) FROM zero_shot_cache").fetchone()[0]
    datasets = [{"dataset": r["dataset"], "cells": int(r["n_cells"]), "sensitive": int(r["n_sensitive"]),
                 "resistant": int(r["n_resistant"]), "genes": int(r["n_genes"]), "values": r["value_kind"],
                 "drug": r["drug"], "cancer_type": r["cancer_type"], "source_sha256": _short(r["source_sha256"])}
                for r in store.datasets().to_dict("records")]
    prov = store.provenance()
    covering = prov.groupby("dataset")["backbone"].agg(sorted).to_dict() if len(prov) else {}
    for d in datasets:                   # which backbones have embeddings of it (probe leaves the others out)
        d["backbones"] = covering.get(d["dataset"], [])
    backbones = []
    for backbone, group in prov.groupby("backbone", sort=True):
        sizes = [store.array_nbytes(rel) for rel in group["array_path"]]
        params = [json.loads(p) for p in group["params"]]
        backbones.append({
            "backbone": backbone, "datasets": len(group), "cells": int(group["n_cells"].sum()),
            "dim": ", ".join(map(str, sorted(set(group["dim"].astype(int))))),
            "dtype": ", ".join(sorted(set(group["dtype"]))),
            "origin": ", ".join(sorted(set(group["origin"]))),
            "bytes": None if any(s is None for s in sizes) else int(sum(sizes)),
            "checkpoint": ", ".join(sorted({_short(c) for c in group["checkpoint_sha256"] if c})) or None,
            "feature_spaces": len({p.get("space_id") for p in params}),
            "scdrugmap_version": ", ".join(sorted(set(group["scdrugmap_version"]))),
        })
    if store.remote:
        index_bytes, models_bytes = getattr(store, "index_size", 0), None
        manifest = None
    else:
        index_bytes, models_bytes = store.index_path.stat().st_size, _dir_bytes(store.path / "models")
        manifest = _manifest_note(store.path / "manifest.json")
    leftovers = None if store.remote else reclaimable(store)
    emb = [b["bytes"] for b in backbones]
    embeddings_bytes = None if any(b is None for b in emb) else int(sum(emb))
    return {
        "location": store.location, "read_only": store.read_only,
        "schema_version": int(meta.get("schema_version", 0)), "reader_schema_version": SCHEMA_VERSION,
        "created_by": meta.get("created_by"), "created_at": meta.get("created_at"),
        "migrated": sorted(k for k in meta if k.startswith("migrated_from_")), "scdrugmap_version": __version__,
        "datasets": datasets, "backbones": backbones,
        "cells": sum(d["cells"] for d in datasets), "probe_runs": int(n_runs), "probe_results": int(n_results),
        "zero_shot_cached_answers": int(n_cached),
        "bytes": {"index": int(index_bytes), "embeddings": embeddings_bytes, "models": models_bytes,
                  "total": None if embeddings_bytes is None or models_bytes is None
                  else int(index_bytes + embeddings_bytes + models_bytes)},
        "pack_manifest": manifest, "reclaimable": leftovers,
    }


def _manifest_note(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        return {"created_at": m.get("created_at"), "scdrugmap_version": m.get("scdrugmap_version"),
                "paths_stripped": m.get("paths_stripped"), "files": len(m.get("files", {}))}
    except (ValueError, OSError):
        return {"error": "manifest.json is unreadable"}


def pack_info(manifest: dict, path: Path, kind: str) -> dict:
    """The summary of a pack, from its manifest (nothing else is read)."""
    backbones: dict[str, dict] = {}
    for row in manifest.get("provenance", []):
        b = backbones.setdefault(row["backbone"], {"backbone": row["backbone"], "datasets": 0, "cells": 0,
                                                   "dims": set(), "dtypes": set(), "origins": set()})
        b["datasets"] += 1
        b["cells"] += int(row["n_cells"])
        b["dims"].add(int(row["dim"]))
        b["dtypes"].add(row["dtype"])
        b["origins"].add(row.get("origin") or "extracted")
    return {
        "location": str(path), "kind": kind, "format_version": manifest.get("format_version"),
        "schema_version": manifest.get("schema_version"), "reader_schema_version": SCHEMA_VERSION,
        "packed_by": f"scdrugmap {manifest.get('scdrugmap_version')}", "packed_at": manifest.get("created_at"),
        "paths_stripped": manifest.get("paths_stripped"), "files": len(manifest.get("files", {})),
        "bytes": manifest.get("total_bytes"), "cells": manifest.get("n_cells"),
        "probe_runs": manifest.get("probe_runs"),
        "datasets": [{"dataset": d["dataset"], "cells": d["n_cells"], "sensitive": d["n_sensitive"],
                      "resistant": d["n_resistant"], "drug": d.get("drug"), "cancer_type": d.get("cancer_type"),
                      "source_sha256": _short(d.get("source_sha256"))} for d in manifest.get("datasets", [])],
        "backbones": [{"backbone": b["backbone"], "datasets": b["datasets"], "cells": b["cells"],
                       "dim": ", ".join(map(str, sorted(b["dims"]))), "dtype": ", ".join(sorted(b["dtypes"])),
                       "origin": ", ".join(sorted(b["origins"]))} for b in backbones.values()],
    }
