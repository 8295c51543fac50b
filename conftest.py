"""Root pytest configuration.

``pytest --nbval`` collects the book's MyST chapters (``book/*.md``): each is converted to ``.ipynb``
under pytest's cache folder with the smoke parameters injected after its ``parameters`` cell, then
executed cell by cell by nbval (outputs are not compared; the chapters' ``assert`` statements are the
checks). Tests and notebooks use a private cache folder unless ``UBW_CACHE`` is set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NBVAL_PARAMETERS = {"profile": "smoke"}


_PRIVATE_CACHE: str | None = None


def pytest_configure(config):
    global _PRIVATE_CACHE
    if not os.environ.get("UBW_CACHE"):
        _PRIVATE_CACHE = tempfile.mkdtemp(prefix="ubw-test-cache-")
        os.environ["UBW_CACHE"] = _PRIVATE_CACHE
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_unconfigure(config):
    """Remove the private cache this run made (about 100 MB of models and data); a cache named by the user's
    own ``UBW_CACHE`` is left alone."""
    global _PRIVATE_CACHE
    if _PRIVATE_CACHE is not None:
        shutil.rmtree(_PRIVATE_CACHE, ignore_errors=True)
        if os.environ.get("UBW_CACHE") == _PRIVATE_CACHE:
            del os.environ["UBW_CACHE"]
        _PRIVATE_CACHE = None


def pytest_collect_file(file_path, parent):
    opt = parent.config.option
    if not (getattr(opt, "nbval", False) or getattr(opt, "nbval_lax", False)):
        return None
    if file_path.suffix != ".md" or file_path.parent != ROOT / "book":
        return None
    from nbval.plugin import IPyNbFile

    from ubwlib.book import _is_notebook, write_test_notebook

    if not _is_notebook(file_path):
        return None
    cache = getattr(parent.config, "cache", None)  # absent with -p no:cacheprovider
    folder = Path(cache.mkdir("nbval")) if cache is not None else Path(tempfile.mkdtemp(prefix="ubw-nbval-"))
    out = folder / f"{file_path.stem}.ipynb"
    write_test_notebook(file_path, out, NBVAL_PARAMETERS)
    return IPyNbFile.from_parent(parent, path=out)
