"""Where ubwlib keeps what it computes (never inside a user's dataset folder)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "data_cache_dir"]


def cache_root() -> Path:
    """``$UBW_CACHE`` if set, else ``$XDG_CACHE_HOME/ubwlib`` (``~/.cache/ubwlib``)."""
    env = os.environ.get("UBW_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "ubwlib").resolve()


def data_cache_dir() -> Path:
    """Folder for derived copies of datasets (decoded tensors of the sources, downloads)."""
    return cache_root() / "data"
