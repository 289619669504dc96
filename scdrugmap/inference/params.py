"""How provenance parameters are compared (frozen heads and LoRA runs alike)."""

from __future__ import annotations

import json


def canonical(value) -> str:
    """A parameter as compared: local file paths by their file name only (the same checkpoint in
    another folder, or a store whose paths were stripped by 'store pack --strip-paths')."""
    def strip(v):
        if isinstance(v, str) and "\n" not in v and (v.startswith(("/", "~", "\\\\")) or v[1:3] in (":\\", ":/")):
            return v.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        if isinstance(v, list):
            return [strip(x) for x in v]
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()}
        return v

    return json.dumps(strip(value), sort_keys=True)
