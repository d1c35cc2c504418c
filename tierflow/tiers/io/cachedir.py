"""Where tierflow keeps what it makes for later runs (converted models, probe results)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$TIERFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/tierflow``, else ``~/.cache/tierflow``."""
    explicit_dir = os.environ.get("TIERFLOW_CACHE_DIR")
    if explicit_dir:
        return Path(explicit_dir).expanduser()
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache_home and Path(xdg_cache_home).is_absolute():  # the XDG spec ignores relative paths
        return Path(xdg_cache_home) / "tierflow"
    return Path.home() / ".cache" / "tierflow"
