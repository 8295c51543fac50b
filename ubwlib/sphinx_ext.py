"""Sphinx extension for the book: MathJax from a local copy, so that the built site renders its formulas without
network, opened from ``file://`` or served; and a rebuild of every page when the book's profile changes.

The profile (``UBW_PROFILE``) is a config value of the build (``ubw_profile``, rebuild ``env``): Sphinx reuses
the pages of the previous build when no source changed, so without it ``make book`` after ``make book
PROFILE=smoke`` kept the smoke pages; a changed value makes Sphinx read (and execute) every page again. So is a
hash of everything else the pages' outputs depend on (``ubw_inputs``, :func:`book_inputs`): the code of the
ubwlib modules the chapters can run (:func:`book_modules`: what their cells import, and what those import; not
the command line, the server or the bench), the stored results and the environment variables ubwlib reads. An
unchanged book rebuilds in seconds without running a cell; a changed library or stored table runs every page again (against the warm cache) instead of keeping pages
computed with the old one.

``make book`` reads the pages (executes the chapters) several at a time (:func:`ubwlib.book.build_html`, Sphinx's
parallel read). Sphinx allows that only when every extension says it is safe; two that jupyter-book 1 loads say
nothing, and this extension declares them safe for HTML builds (:data:`PARALLEL_SAFE_EXTENSIONS`, where the reason
is given).

Sphinx's math extension loads MathJax 3 from a CDN by default (jupyter-book 1 keeps that default). This extension
points ``mathjax_path`` at ``_static/mathjax/`` and copies MathJax 3 there from the ``sphinx-mathjax-offline``
package (a dependency of the ``book`` extra; MathJax 3.2.2 under the Apache License 2.0): the same component
(``tex-mml-chtml.js``), with the extensions, fonts and accessibility modules it loads on demand. A local
``mathjax_path`` set in ``_config.yml`` (``sphinx: config:``) is kept. Enabled in ``_config.yml``::

    sphinx:
      extra_extensions: [ubwlib.sphinx_ext]
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
from pathlib import Path

__all__ = ["INPUT_VARIABLES", "MATHJAX_COMPONENT", "MATHJAX_DIR", "PARALLEL_SAFE_EXTENSIONS", "book_inputs",
           "book_modules", "book_profile", "input_folders", "mathjax_source", "setup"]

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


#: Extensions jupyter-book 1 loads that do not say whether Sphinx may read pages in parallel with them: Sphinx then
#: assumes not, warns and reads one page at a time whatever ``-j`` asks. Read (sphinx-multitoc-numbering 0.1.3,
#: sphinx-jupyterbook-latex 1.0.0), neither keeps anything per page in the build environment: the first replaces
#: the section numbering that Sphinx computes in the main process once every page is read; the second adds nodes
#: and transforms, and sets the environment up for a LaTeX builder only. For an HTML build they are declared safe
#: (:func:`_declare_parallel_safe`), so that ``python -m ubwlib.book --html`` executes several chapters at a time.
PARALLEL_SAFE_EXTENSIONS = ("sphinx_multitoc_numbering", "sphinx_jupyterbook_latex")


def _declare_parallel_safe(app) -> None:
    if app.builder.format != "html":
        return
    for name in PARALLEL_SAFE_EXTENSIONS:
        ext = app.extensions.get(name)
        if ext is not None and getattr(ext, "parallel_read_safe", None) is None:
            ext.parallel_read_safe = True


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


_CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _module_file(package: Path, module: str) -> Path | None:
    """The source file of ``module`` (dotted, starting with the package's name) under ``package``, if any."""
    parts = module.split(".")[1:]
    init = package.joinpath(*parts, "__init__.py")
    if init.is_file():
        return init
    source = package.joinpath(*parts).with_suffix(".py") if parts else None
    return source if source is not None and source.is_file() else None


def _imported(tree: ast.AST, package_name: str, current: str | None, is_package: bool) -> set[str]:
    """Every module of ``package_name`` an import statement of ``tree`` may load (anywhere in it, functions
    included): ``from a import b`` counts ``a`` and ``a.b`` (``b`` may be a submodule)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if current is None:
                    continue
                base = current.split(".") if is_package else current.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == package_name or m.startswith(package_name + ".")}


def book_modules(book: Path, package: Path | None = None) -> list[Path] | None:
    """The source files of the ``package`` modules (default: ubwlib) the chapters of ``book`` can run: those
    their code cells import and, transitively, every module those import (every import statement, inside
    functions too), read from the sources with :mod:`ast`, not run. The ``python -m ubwlib.book``/``ubw``
    front ends, the server and the bench are not among them, so editing those re-runs no page. ``None`` (take
    every file) when a code cell cannot be parsed."""
    package = Path(input_folders()[0] if package is None else package)
    name = package.name
    todo = set()
    for chapter in sorted(Path(book).glob("*.md")):
        for cell in _CODE_CELL.findall(chapter.read_text(encoding="utf-8")):
            code = "\n".join("" if line.lstrip().startswith(("%", "!", ":")) else line for line in cell.splitlines())
            try:
                todo |= _imported(ast.parse(code), name, None, False)
            except SyntaxError:
                return None
    seen: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages run their __init__ first
            parent = ".".join(parts[:i])
            path = _module_file(package, parent)
            if path is None or parent in seen:
                continue
            seen[parent] = path
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except SyntaxError:
                return None
            todo |= _imported(tree, name, parent, path.name == "__init__.py") - set(seen)
    return sorted(seen.values())


def book_inputs(folders: tuple[Path, ...] | None = None, modules: list[Path] | None = None) -> str:
    """A hash of the files under ``folders`` (default :func:`input_folders`; compiled caches skipped), by path
    relative to its folder and content, and of :data:`INPUT_VARIABLES`. ``modules``: of the ``.py`` files, only
    these count (:func:`book_modules`); None: all of them."""
    digest = hashlib.sha256()
    keep = None if modules is None else {Path(m).resolve() for m in modules}
    for folder in (input_folders() if folders is None else folders):
        folder = Path(folder)
        files = sorted(f for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts) \
            if folder.is_dir() else []
        for f in files:
            if keep is not None and f.suffix == ".py" and f.resolve() not in keep:
                continue
            digest.update(f"{folder.name}/{f.relative_to(folder).as_posix()}\0".encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    for name in INPUT_VARIABLES:
        digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return digest.hexdigest()


def setup(app):
    app.setup_extension("sphinx.ext.mathjax")
    app.add_config_value("ubw_profile", book_profile(), "env")
    app.add_config_value("ubw_inputs", book_inputs(modules=book_modules(Path(app.srcdir))), "env")
    # After the configuration is read (jupyter-book's `sphinx: config:` included), before the pages are written.
    app.connect("config-inited", _use_local_mathjax, priority=900)
    app.connect("build-finished", _copy_mathjax)
    app.connect("builder-inited", _declare_parallel_safe)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
