"""``scdrugmap serve``: a local web app over a store (Starlette + uvicorn + Jinja2).

The optional extra ``scdrugmap[serve]`` installs what it needs; the core install does not.
"""

from __future__ import annotations

from ..errors import UserError

INSTALL_HINT = "pip install 'scdrugmap[serve]'"


def require_dependencies() -> None:
    """A one-line :class:`UserError` naming the extra when a web dependency is missing."""
    missing = []
    for module, package in (("starlette", "starlette"), ("uvicorn", "uvicorn"), ("jinja2", "jinja2"),
                            ("python_multipart", "python-multipart")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise UserError(f"scdrugmap serve needs {', '.join(missing)}, which are not installed: {INSTALL_HINT}")
