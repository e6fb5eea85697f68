"""Where normsurgery keeps what it builds: reference models and their data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$NORMSURGERY_CACHE`, else `$XDG_CACHE_HOME/normsurgery`, else `~/.cache/normsurgery`."""
    explicit = os.environ.get("NORMSURGERY_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "normsurgery"


def models_dir() -> Path:
    """The folder holding built reference models, one sub-folder each."""
    return cache_root() / "models"
