"""Progress bars: one place decides where they show.

A bar shows only where its output is a terminal (tqdm's ``disable=None``): on the command line, not in an
executed notebook, where a text bar would end up in the book's pages and tqdm's notebook widget needs
ipywidgets (without it, tqdm warns ``IProgress not found`` into the page). ``progress=False`` hides it always,
and so does ``TQDM_DISABLE=1`` in the environment.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Any = None, *, progress: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown only when ``progress`` and the output is a terminal."""
    if not progress:
        kwargs["disable"] = True
    elif "TQDM_DISABLE" not in os.environ:  # else tqdm's own default reads it
        kwargs["disable"] = None
    return tqdm(iterable, **kwargs)
