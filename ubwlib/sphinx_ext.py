"""Sphinx extension for the book: MathJax from a local copy, so that the built site renders its formulas without
network, opened from ``file://`` or served; and a rebuild of every page when the book's profile changes.

The profile (``UBW_PROFILE``) is a config value of the build (``ubw_profile``, rebuild ``env``): Sphinx reuses
the pages of the previous build when no source changed, so without it ``make book`` after ``make book
PROFILE=smoke`` kept the smoke pages; a changed value makes Sphinx read (and execute) every page again. So is a
hash of everything else the pages' outputs depend on (``ubw_inputs``, :func:`book_inputs`): ubwlib's code, the
stored results and the environment variables ubwlib reads. An unchanged book rebuilds in seconds without running a
cell; a changed library or stored table runs every page again (against the warm cache) instead of keeping pages
computed with the old one.

Sphinx's math extension loads MathJax 3 from a CDN by default (jupyter-book 1 keeps that default). This extension
points ``mathjax_path`` at ``_static/mathjax/`` and copies MathJax 3 there from the ``sphinx-mathjax-offline``
package (a dependency of the ``book`` extra; MathJax 3.2.2 under the Apache License 2.0): the same component
(``tex-mml-chtml.js``), with the extensions, fonts and accessibility modules it loads on demand. A local
``mathjax_path`` set in ``_config.yml`` (``sphinx: config:``) is kept. Enabled in ``_config.yml``::

    sphinx:
      extra_extensions: [ubwlib.sphinx_ext]
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["INPUT_VARIABLES", "MATHJAX_COMPONENT", "MATHJAX_DIR", "book_inputs", "book_profile", "input_folders",
           "mathjax_source", "setup"]

#: The MathJax component the pages load: the one Sphinx loads from its CDN by default.
MATHJAX_COMPONENT = "tex-mml-chtml.js"
#: Where the copy goes, under the site's ``_static/``.
MATHJAX_DIR = "mathjax"
_DISTRIBUTION = "sphinx-mathjax-offline"


def mathjax_source() -> Path:
    """The folder of the installed MathJax 3 copy (``sphinx-mathjax-offline``'s ``static/mathjax``)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the book renders its formulas with a local MathJax from the {_DISTRIBUTION!r} "
                           "package: install the book's dependencies (`make install`, or "
                           "`pip install -c constraints.txt -e '.[book]'`)") from None
    folder = Path(dist.locate_file(f"{_DISTRIBUTION}/static/mathjax"))
    if not (folder / MATHJAX_COMPONENT).is_file():
        raise RuntimeError(f"{folder / MATHJAX_COMPONENT} is missing: reinstall {_DISTRIBUTION}")
    return folder


def _is_remote(path: str) -> bool:
    return not path or "://" in path or path.startswith("//")


def _use_local_mathjax(app, config) -> None:
    if _is_remote(str(config.mathjax_path or "")):
        mathjax_source()  # fail early, with the install command, when the copy is missing
        config.mathjax_path = f"{MATHJAX_DIR}/{MATHJAX_COMPONENT}"


def _copy_mathjax(app, exc) -> None:
    if exc is not None or app.builder.format != "html":
        return
    if not str(app.config.mathjax_path).startswith(f"{MATHJAX_DIR}/"):
        return  # another MathJax chosen in the configuration
    source = mathjax_source()

    def ignore(folder: str, names: list[str]) -> list[str]:
        """The other combined components at the top (``tex-svg.js``, ``mml-chtml.js``...): 24 MB -> 10 MB."""
        if Path(folder) != source:
            return []
        return [n for n in names if n.endswith(".js") and n != MATHJAX_COMPONENT]

    shutil.copytree(source, Path(app.outdir) / "_static" / MATHJAX_DIR, ignore=ignore, dirs_exist_ok=True)


def book_profile() -> str:
    """The profile the book is built with (``UBW_PROFILE``, else ``default``, as the chapters choose it); ``auto``:
    the profile chosen for this machine (:mod:`ubwlib.experiments.choice`, recorded, so the chapters read the same)."""
    name = os.environ.get("UBW_PROFILE") or "default"
    if name == "auto":
        from .experiments.choice import choose

        name = choose().profile
    return name


#: The environment variables ubwlib reads that change what a page computes (the profile has its own config value;
#: the cache's location does not change a number).
INPUT_VARIABLES = ("UBW_DATA", "UBW_DEVICE", "UBW_PRECISION")


def input_folders() -> tuple[Path, ...]:
    """The folders whose files the pages' outputs depend on besides their sources: the ubwlib package and the
    stored results (``results/`` beside it)."""
    package = Path(__file__).resolve().parent
    return package, package.parent / "results"


def book_inputs(folders: tuple[Path, ...] | None = None) -> str:
    """A hash of every file under ``folders`` (default :func:`input_folders`; compiled caches skipped), by path
    relative to its folder and content, and of :data:`INPUT_VARIABLES`."""
    digest = hashlib.sha256()
    for folder in (input_folders() if folders is None else folders):
        folder = Path(folder)
        files = sorted(f for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts) \
            if folder.is_dir() else []
        for f in files:
            digest.update(f"{folder.name}/{f.relative_to(folder).as_posix()}\0".encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    for name in INPUT_VARIABLES:
        digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return digest.hexdigest()


def setup(app):
    app.setup_extension("sphinx.ext.mathjax")
    app.add_config_value("ubw_profile", book_profile(), "env")
    app.add_config_value("ubw_inputs", book_inputs(), "env")
    # After the configuration is read (jupyter-book's `sphinx: config:` included), before the pages are written.
    app.connect("config-inited", _use_local_mathjax, priority=900)
    app.connect("build-finished", _copy_mathjax)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
