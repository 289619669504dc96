"""How provenance parameters are compared (frozen heads and LoRA runs alike)."""

from __future__ import annotations

import json

from ..store.common import strip_paths


def canonical(value) -> str:
    """A parameter as compared: local file paths by their file name only (the same checkpoint in
    another folder, or a store whose paths were stripped by 'store pack --strip-paths')."""
    return json.dumps(strip_paths(value), sort_keys=True)
