"""Running the book's chapters: the HTML build with several chapters at a time, parameterised papermill runs and
nbval conversion.

Build the HTML book, executing as many chapters at a time as there are cores (what ``make book`` does)::

    python -m ubwlib.book --html [--jobs N]          # -> book/_build/html/

Chapters are MyST Markdown notebooks (Jupytext). papermill cannot read ``.md`` and nbval only collects
``.ipynb``, so both go through :func:`read_chapter` (``jupytext.read``) first. Every chapter has one
code cell tagged ``parameters`` (``profile = None`` means ``$UBW_PROFILE`` or ``default``).

Run every chapter on a profile (what ``make runs PROFILE=...`` does)::

    python -m ubwlib.book --profile smoke            # -> book/_build/runs/smoke/*.ipynb

Store every table the chapters compute, with provenance (what ``make results PROFILE=...`` does)::

    python -m ubwlib.book --store --profile smoke ubw_p verification      # -> results/smoke/...
    python -m ubwlib.book --store --via recipes --profile full ubw_p      # no Jupyter: e.g. on a GPU machine

One chapter by hand::

    jupytext --to ipynb -o /tmp/dispersibility.ipynb book/dispersibility.md
    papermill /tmp/dispersibility.ipynb out.ipynb -p profile smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["BOOK_DIR", "build_html", "chapter_paths", "html_jobs", "read_chapter", "write_test_notebook", "run_chapters",
           "store_results", "main"]

BOOK_DIR = Path(__file__).resolve().parent.parent / "book"


def chapter_paths(book_dir: Path | str = BOOK_DIR) -> list[Path]:
    """The executable chapters (MyST notebooks with a Jupytext header) in table-of-contents order."""
    book_dir = Path(book_dir)
    toc = book_dir / "_toc.yml"
    ordered: list[Path] = []
    if toc.exists():
        import yaml

        def walk(node):
            if isinstance(node, dict):
                for key in ("root", "file"):
                    if key in node:  # sphinx-external-toc: "with or without the file extension"
                        name = str(node[key])
                        ordered.append(book_dir / (name if name.endswith(".md") else name + ".md"))
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(yaml.safe_load(toc.read_text()))
    else:
        ordered = sorted(book_dir.glob("*.md"))
    return [p for p in ordered if p.exists() and _is_notebook(p)]


def _is_notebook(path: Path) -> bool:
    head = path.read_text(encoding="utf-8")[:2000]
    return head.startswith("---") and "jupytext" in head and "kernelspec" in head


def read_chapter(path: Path | str):
    """The chapter as an ``nbformat`` notebook (via ``jupytext.read``)."""
    import jupytext

    return jupytext.read(str(path))


def _inject(nb, parameters: dict):
    """Insert a cell assigning ``parameters`` right after the ``parameters`` cell (as papermill does)."""
    import nbformat

    idx = next(
        (i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])),
        None,
    )
    if idx is None:
        raise ValueError("chapter has no code cell tagged 'parameters'")
    src = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(idx + 1, cell)
    return nb


def write_test_notebook(md_path: Path | str, out_path: Path | str, parameters: dict) -> Path:
    """Convert a chapter to ``.ipynb`` for nbval: parameters injected, outputs not compared (every code
    cell tagged ``nbval-ignore-output``; a chapter's checks are its ``assert`` statements)."""
    import nbformat

    nb = _inject(read_chapter(md_path), parameters)
    for cell in nb.cells:
        if cell.cell_type == "code":
            tags = cell.metadata.setdefault("tags", [])
            if "nbval-ignore-output" not in tags:
                tags.append("nbval-ignore-output")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(out_path))
    return out_path


def html_jobs(jobs: int | str | None = "auto") -> int:
    """How many pages :func:`build_html` reads (chapters it executes) at a time: ``auto`` (or None) the CPU cores
    this process may run on, else the positive integer given."""
    if jobs is None or jobs == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not on Linux
            return max(1, os.cpu_count() or 1)
    try:
        n = int(jobs)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(jobs).strip():
        raise ValueError(f"jobs must be a positive integer or 'auto', got {jobs!r}")
    return n


def build_html(book_dir: Path | str = BOOK_DIR, jobs: int | str | None = "auto") -> Path:
    """Build the book's HTML as ``jupyter-book build -W --keep-going <book_dir>`` does (its configuration, its
    table of contents, warnings as errors), reading :func:`html_jobs` pages at a time; returns the HTML folder.

    jupyter-book's command line reads one page at a time, and a warm rebuild (every result in the cache) spends
    most of its time starting a kernel and importing torch, pandas and matplotlib per chapter, on one core. With
    Sphinx's parallel read (``ubwlib.sphinx_ext`` declares the two extensions that do not say so safe for it)
    the chapters are executed ``jobs`` at a time, each in its own kernel. Their computations do not run side by
    side: the cache lets one process compute at a time (:meth:`ubwlib.cache.Cache.computing`), so a cold build
    trains as it does one chapter at a time, and a result two chapters need is computed once. The pages are the
    same as jupyter-book's (the same cells, kernels and cache). Exits with Sphinx's status when the build fails."""
    n = html_jobs(jobs)
    book_dir = Path(book_dir)
    if not (book_dir / "_toc.yml").is_file():
        raise FileNotFoundError(f"{book_dir} has no _toc.yml: give the book's folder (the one with _config.yml and "
                                "_toc.yml), e.g. book/")
    try:
        from jupyter_book.cli.main import build, builder_specific_actions
        from jupyter_book.sphinx import build_sphinx
    except ImportError as err:
        raise RuntimeError(f"the HTML build needs jupyter-book ({err}): install the book's dependencies (`make "
                           "install`, or `pip install -c constraints.txt -e '.[book]'`)") from None
    # jupyter-book's own configuration of `jupyter-book build book/` (what `jupyter-book config sphinx` writes out)
    path_config, source, overrides = build.callback(
        path_source=str(book_dir), path_output=None, config=None, toc=None, warningiserror=True, nitpick=False,
        keep_going=True, freshenv=False, builder="html", custom_builder=None, verbose=0, quiet=0,
        individualpages=False, get_config_only=True)
    out = book_dir.absolute() / "_build" / "html"
    print(f"Building the book in {out} from {source}, {n} page(s) at a time", flush=True)
    result = build_sphinx(source, out, use_external_toc=True, noconfig=True, path_config=path_config,
                          confoverrides=overrides, builder="html", warningiserror=True, keep_going=True, jobs=n)
    builder_specific_actions(result, "html", out, "book", None, print)
    return out


def run_chapters(profile: str, out_dir: Path | str | None = None, chapters: list[str] | None = None,
                 extra_parameters: dict | None = None) -> list[tuple[str, float]]:
    """Execute chapters with papermill (``-p profile <profile>``) into ``out_dir``; returns (chapter, seconds)."""
    import nbformat
    import papermill

    out_dir = Path(out_dir) if out_dir else BOOK_DIR / "_build" / "runs" / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"profile": profile, **(extra_parameters or {})}
    timings = []
    for md in chapter_paths():
        if chapters and md.stem not in chapters:
            continue
        src = out_dir / f"{md.stem}.input.ipynb"
        nbformat.write(read_chapter(md), str(src))
        t0 = time.perf_counter()
        papermill.execute_notebook(str(src), str(out_dir / f"{md.stem}.ipynb"), parameters=params,
                                   cwd=str(BOOK_DIR), progress_bar=False)
        src.unlink()
        timings.append((md.stem, time.perf_counter() - t0))
        print(f"{md.stem}: {timings[-1][1]:.1f} s -> {out_dir / (md.stem + '.ipynb')}", flush=True)
    return timings


def store_results(profile: str, chapters: list[str] | None = None, *, root: Path | str | None = None,
                  via: str = "papermill", command: str = "", notebooks: Path | str | None = None
                  ) -> list[tuple[str, float]]:
    """Store every table of ``chapters`` (default: all chapters with tables, in the order a GPU session runs
    them) under ``root/<profile>/`` (default: the repository's ``results/``), with provenance and the wall time
    of each chapter (``make results``). ``via="papermill"`` executes each chapter, whose
    :func:`~ubwlib.experiments.stored.chapter_table` calls store its tables (a registered table the chapter did
    not compute is an error; the executed notebooks go to ``notebooks``, default ``book/_build/runs/<profile>``);
    ``via="recipes"`` calls the registered recipes directly (no Jupyter needed). Returns (chapter, seconds)."""
    import os
    from unittest import mock

    from .experiments import get_profile
    from .experiments import stored

    P = get_profile(profile)
    chapters = list(chapters or stored.CHAPTERS)
    for c in chapters:
        stored.chapter_tables(c)  # an unknown chapter fails before anything runs
    if via not in ("papermill", "recipes"):
        raise ValueError(f"via must be 'papermill' or 'recipes', got {via!r}")
    directory = Path(root if root is not None else stored.RESULTS_ROOT) / P.name
    command = command or f"python -m ubwlib.book --store --via {via} --profile {P.name} {' '.join(chapters)}"
    done = []
    for chapter in chapters:
        t0, started = time.perf_counter(), time.time()
        if via == "recipes":
            stored.store_chapter(P, chapter, directory, command=command)
        else:
            with mock.patch.dict(os.environ, {stored.STORE_ENV: str(directory), stored.COMMAND_ENV: command}):
                run_chapters(P.name, out_dir=notebooks, chapters=[chapter])
            missing = stored.unstored_since(directory, chapter, started)
            if missing:
                raise RuntimeError(f"chapter {chapter} ran but did not store {missing}: a chapter must compute its "
                                   "registered tables with ubwlib.experiments.stored.chapter_table")
        seconds = time.perf_counter() - t0
        stored.record_chapter(directory, chapter, seconds, via=via, command=command)
        done.append((chapter, seconds))
        print(f"{chapter}: tables stored in {seconds:.1f} s -> {directory / chapter}", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ubwlib.book", description="Run the book's chapters with papermill.")
    ap.add_argument("--profile", default="default", help="smoke, default, study, full or paper (default: %(default)s)")
    ap.add_argument("--out", default=None, help="output folder (default: book/_build/runs/<profile>; with --store: "
                                                "the results folder, default results/)")
    ap.add_argument("--store", action="store_true",
                    help="store every table of the chapters under results/<profile>/ with provenance (make results)")
    ap.add_argument("--via", choices=("papermill", "recipes"), default="papermill",
                    help="with --store: execute the chapters (default) or call their recipes directly (no Jupyter)")
    ap.add_argument("--html", action="store_true",
                    help="build the HTML book as `jupyter-book build -W --keep-going book/` does, several chapters at "
                         "a time (make book)")
    ap.add_argument("--jobs", default="auto",
                    help="with --html: pages read (chapters executed) at a time; auto: the CPU cores (default)")
    ap.add_argument("chapters", nargs="*", help="chapter names (file stems, commas allowed); default: all")
    args = ap.parse_args(argv)
    if args.html:
        if args.store or args.chapters:
            ap.error("--html builds the whole book: no chapters, no --store")
        try:
            html_jobs(args.jobs)
        except ValueError as err:
            ap.error(f"--jobs: {err}")
        build_html(jobs=args.jobs)
        return 0
    chapters = [c for arg in args.chapters for c in arg.split(",") if c]
    if args.store:
        command = " ".join(["python -m ubwlib.book", *(argv if argv is not None else sys.argv[1:])])
        timings = store_results(args.profile, chapters or None, root=args.out, via=args.via, command=command)
        print(f"total: {sum(t for _, t in timings):.1f} s for {len(timings)} chapter(s)")
        return 0
    timings = run_chapters(args.profile, args.out, chapters or None)
    print(f"total: {sum(t for _, t in timings):.1f} s for {len(timings)} chapter(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
