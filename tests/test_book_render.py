"""The built book as a reader sees it (issue 10): formulas rendered with no network, a dash where a value does not
apply, headers naming the profile, no stray warnings or progress bars in the pages.

A small book (the real configuration, ``intro``, the ``dispersibility`` chapter on the ``smoke`` profile and a
tiny page of tables) is built with jupyter-book in a temporary folder, then opened in headless Chromium with every
host name unresolvable, from ``file://`` and from a local HTTP server. The browser checks skip when Chromium is
missing (``apt-get install chromium``; ``.ci/run`` installs it). About a minute on 2 CPU cores when the smoke
model of the dispersibility chapter is not cached yet, half that when it is.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ubwlib.experiments.claims import shown
from ubwlib.experiments.stored import NA_REP, book_display, frame_html

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = "dispersibility"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
JUPYTER_BOOK = Path(sys.executable).parent / "jupyter-book"

# The front matter of a MyST notebook page.
NOTEBOOK_HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""

# A page of the tables the chapters show, small enough to cost a kernel start: NaN where a value does not apply
# (No Attack's ASR), a Styler (the report's way), a claims table on a named profile.
TABLES_PAGE = NOTEBOOK_HEADER + """
# Tables

Where a value does not apply, the tables show a dash.

```{code-cell} ipython3
import numpy as np
import pandas as pd

from ubwlib.experiments.claims import shown
from ubwlib.experiments.stored import book_display

book_display()
table1 = pd.DataFrame({"BA": [0.912, 0.905], "ASR-A": [np.nan, 0.871], "ASR (targeted)": [np.nan, np.nan]},
                      index=pd.Index(["No Attack", "UBW-P"], name="method"))
table1
```

```{code-cell} ipython3
table1.style.map(lambda v: "font-weight: bold" if v == 0.871 else "")
```

```{code-cell} ipython3
checks = pd.DataFrame({"claim": ["UBW-P's ASR-A is high"], "paper's evidence": ["Table 1"], "ours": ["87.1%"],
                       "verdict": ["holds"], "known gap": [""]}, index=pd.Index(["ubw-p/asr-a"], name="id"))
shown(checks, "smoke")
```
"""

# Warnings that only say the small book lacks the other chapters (a link from the intro to one of them).
PARTIAL_BOOK = re.compile(r"unknown document|undefined label|reference target not found|"
                          r"isn't included in any toctree|term not in glossary")


# ------------------------------------------------------------------------------------------ display helpers
def test_frame_html_is_pandas_html_with_a_dash_for_missing_values():
    df = pd.DataFrame({"ASR": [np.nan, 0.5], "eval set": [None, "source class"]}, index=["No Attack", "UBW-P"])
    out = frame_html(df)
    assert "NaN" not in out and "None" not in out and out.count(f"<td>{NA_REP}</td>") == 2
    assert out == df._repr_html_().replace("<td>NaN</td>", f"<td>{NA_REP}</td>").replace(
        "<td>None</td>", f"<td>{NA_REP}</td>")
    assert df["ASR"].isna().sum() == 1  # the data keep NaN
    long = pd.DataFrame({"x": np.arange(100.0)})  # truncated as pandas does (display.min_rows)
    assert frame_html(long) == long._repr_html_()


def test_book_display_outside_ipython_sets_the_styler_dash():
    with pd.option_context("styler.format.na_rep", None):
        book_display()  # no IPython shell here: nothing else to do
        assert NA_REP in pd.DataFrame({"x": [np.nan]}).style.to_html()


def test_claims_headers_name_the_profile():
    checks = pd.DataFrame({"claim": ["c"], "paper's evidence": ["p"], "ours": ["1"], "verdict": ["holds"],
                           "known gap": ["g"]}, index=["id"])
    out = shown(checks, "smoke")
    assert list(out.columns) == ["claim", "paper's evidence", "ours (smoke)", "verdict (smoke)"]
    out = shown(checks, "default", ["claim", "ours", "verdict", "known gap"])
    assert list(out.columns) == ["claim", "ours (default)", "verdict (default)", "known gap (default)"]
    assert list(checks.columns) == ["claim", "paper's evidence", "ours", "verdict", "known gap"]


def test_book_config_loads_the_local_mathjax():
    import yaml

    from ubwlib import sphinx_ext

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "ubwlib.sphinx_ext" in config["sphinx"]["extra_extensions"]
    source = sphinx_ext.mathjax_source()
    assert (source / sphinx_ext.MATHJAX_COMPONENT).is_file()
    assert (source / "output" / "chtml" / "fonts" / "woff-v2").is_dir()


def test_a_changed_profile_rebuilds_every_page(tmp_path, monkeypatch):
    """Sphinx reuses unchanged pages; the book's profile is a config value, so a new profile re-reads them all."""
    from sphinx.application import Sphinx

    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text("extensions = ['ubwlib.sphinx_ext']\n")
    (src / "index.rst").write_text("Title\n=====\n\nSome text.\n")

    def pages_read(profile):
        monkeypatch.setenv("UBW_PROFILE", profile)
        app = Sphinx(str(src), str(src), str(tmp_path / "html"), str(tmp_path / "doctrees"), "html",
                     status=None, warning=None)
        read = []
        app.connect("source-read", lambda _app, docname, _source: read.append(docname))
        app.build()
        assert app.config.ubw_profile == profile
        return read

    assert pages_read("smoke") == ["index"]
    assert pages_read("smoke") == []  # nothing changed: nothing read
    assert pages_read("default") == ["index"]  # the profile changed: every page again


def test_changed_code_results_or_precision_rebuild_every_page(tmp_path, monkeypatch):
    """What a page computes depends on ubwlib's code (the modules the chapters import, and theirs), the stored
    results and UBW_PRECISION/UBW_DATA/UBW_DEVICE, none of them a page's source: a change to any of them re-reads
    every page; no change reads none."""
    from sphinx.application import Sphinx
    from ubwlib import sphinx_ext

    src, code, results = tmp_path / "src", tmp_path / "ubwlib", tmp_path / "results"
    for d in (src, code / "__pycache__", results / "study"):
        d.mkdir(parents=True)
    (src / "conf.py").write_text("extensions = ['ubwlib.sphinx_ext']\n")
    (src / "index.rst").write_text("Title\n=====\n\nSome text.\n")
    # a chapter's code imports ubwlib.train (Sphinx reads only the .rst here; book_modules reads the .md)
    (src / "chapter.md").write_text("# Chapter\n\n```{code-cell} ipython3\n:tags: [hide-input]\n%matplotlib inline\n"
                                    "from ubwlib.train import LR\n```\n")
    (code / "__init__.py").write_text("")
    (code / "train.py").write_text("LR = 0.1\n")
    (code / "cli.py").write_text("from .train import LR\n")  # imports the library; no chapter imports it
    (results / "study" / "table.csv").write_text("row,ASR-A\na,0.5\n")
    monkeypatch.setattr(sphinx_ext, "input_folders", lambda: (code, results))
    monkeypatch.setenv("UBW_PROFILE", "smoke")
    for name in sphinx_ext.INPUT_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def pages_read():
        app = Sphinx(str(src), str(src), str(tmp_path / "html"), str(tmp_path / "doctrees"), "html",
                     status=None, warning=None)
        read = []
        app.connect("source-read", lambda _app, docname, _source: read.append(docname))
        app.build()
        assert app.config.ubw_inputs == sphinx_ext.book_inputs((code, results), sphinx_ext.book_modules(src))
        return read

    assert pages_read() == ["index"]
    assert pages_read() == []  # nothing changed: nothing read, nothing executed
    (code / "__pycache__" / "train.cpython-312.pyc").write_bytes(b"compiled")
    assert pages_read() == []  # a compiled cache is not an input
    (code / "train.py").write_text("LR = 0.2\n")
    assert pages_read() == ["index"]  # the library changed
    assert pages_read() == []
    (code / "cli.py").write_text("from .train import LR\nPORT = 8000\n")
    assert pages_read() == []  # a module no chapter can run (the command line, here) is not an input
    (results / "study" / "table.csv").write_text("row,ASR-A\na,0.25\n")
    assert pages_read() == ["index"]  # a stored table changed
    monkeypatch.setenv("UBW_PRECISION", "fp32")
    assert pages_read() == ["index"]  # another precision computes other numbers
    (results / "study" / "table.csv").rename(results / "study" / "renamed.csv")
    assert pages_read() == ["index"]  # a file's name is part of the input


def test_book_modules_of_the_book_leave_out_only_the_front_ends():
    """The chapters can run every module of ubwlib but the front ends (command line, papermill runner, server,
    remote client, ONNX export, bench, the GPU machine's device check) and this extension."""
    from ubwlib import sphinx_ext

    package = sphinx_ext.input_folders()[0]
    every = {p for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    used = sphinx_ext.book_modules(ROOT / "book")
    assert set(used) <= every
    assert sorted(p.relative_to(package).as_posix() for p in every - set(used)) == [
        "bench.py", "book.py", "cli.py", "devicecheck.py", "onnx_model.py", "remote.py", "serve.py",
        "sphinx_ext.py"]


def test_book_modules_follow_every_import_statement(tmp_path):
    from ubwlib import sphinx_ext

    pkg, book = tmp_path / "ubwlib", tmp_path / "book"
    (pkg / "sub").mkdir(parents=True)
    book.mkdir()
    files = {
        "__init__.py": "",
        "a.py": "from . import b\nfrom .sub.c import f\n",
        "b.py": "def g():\n    from .sub import lazy  # inside a function: counted\n",
        "sub/__init__.py": "from ..d import X\n",
        "sub/c.py": "def f(): pass\n",
        "sub/lazy.py": "",
        "d.py": "X = 1\n",
        "unused.py": "import ubwlib.a\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    (book / "ch.md").write_text("Prose `from ubwlib import unused` is not code.\n\n```{code-cell} ipython3\n"
                                ":tags: [parameters]\n!ls\nimport ubwlib.a\n```\n")
    got = sphinx_ext.book_modules(book, pkg)
    assert sorted(p.relative_to(pkg).as_posix() for p in got) == [
        "__init__.py", "a.py", "b.py", "d.py", "sub/__init__.py", "sub/c.py", "sub/lazy.py"]
    (book / "broken.md").write_text("```{code-cell} ipython3\nimport (\n```\n")
    assert sphinx_ext.book_modules(book, pkg) is None  # cannot tell: every file counts
    assert sphinx_ext.book_inputs((pkg,), None) == sphinx_ext.book_inputs((pkg,))


def test_jupyter_books_undeclared_extensions_are_declared_parallel_safe_for_html_only(tmp_path):
    """Without the declaration Sphinx reads one page at a time whatever -j asks (and -W fails on its warning)."""
    from sphinx.application import Sphinx

    from ubwlib.sphinx_ext import PARALLEL_SAFE_EXTENSIONS

    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(f"extensions = {[*PARALLEL_SAFE_EXTENSIONS, 'ubwlib.sphinx_ext']!r}\n")
    (src / "index.rst").write_text("Title\n=====\n")
    allowed = {}
    for builder in ("html", "latex"):
        app = Sphinx(str(src), str(src), str(tmp_path / builder), str(tmp_path / f"{builder}-doctrees"), builder,
                     status=None, warning=None, parallel=2)
        allowed[builder] = [app.extensions[name].parallel_read_safe for name in PARALLEL_SAFE_EXTENSIONS]
    assert allowed == {"html": [True, True], "latex": [None, None]}


def test_html_jobs():
    from ubwlib.book import html_jobs, main

    assert html_jobs("auto") == html_jobs(None) == len(os.sched_getaffinity(0))
    assert html_jobs(3) == html_jobs("3") == 3
    for bad in (0, "0", -1, "two", "2.5", 2.5):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            html_jobs(bad)
    with pytest.raises(SystemExit):
        main(["--html", "ubw_p"])


def test_build_html_names_the_fix_for_a_wrong_folder_or_a_missing_jupyter_book(tmp_path, monkeypatch):
    from ubwlib.book import build_html

    with pytest.raises(FileNotFoundError, match="has no _toc.yml: give the book's folder"):
        build_html(tmp_path)
    for name in ("jupyter_book", "jupyter_book.cli", "jupyter_book.cli.main", "jupyter_book.sphinx"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as where it is not installed
    with pytest.raises(RuntimeError, match=r"needs jupyter-book .*make install"):
        build_html(ROOT / "book")


# A page whose kernel says which process started it: the Sphinx process that read the page.
PID_PAGE = NOTEBOOK_HEADER + """
# Page {i}

```{{code-cell}} ipython3
import os
print("read by", os.getppid())
```
"""


def test_build_html_reads_several_chapters_at_a_time(tmp_path):
    """``make book``'s build: jupyter-book's configuration, the pages read (their kernels started) by several
    Sphinx processes, the same pages as one at a time."""
    if not JUPYTER_BOOK.exists():
        pytest.skip(f"jupyter-book is not installed next to {sys.executable} (pip install -e '.[book]')")
    book = tmp_path / "book"
    book.mkdir()
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    shutil.copytree(ROOT / "book" / "_static", book / "_static")
    (book / "intro.md").write_text("# Intro\n\nSix pages follow.\n")
    pages = [f"page{i}" for i in range(6)]
    for i, name in enumerate(pages):
        (book / f"{name}.md").write_text(PID_PAGE.format(i=i), encoding="utf-8")
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n" +
                                   "".join(f"  - file: {n}\n" for n in pages))
    code = f"import os; print('main', os.getpid()); from ubwlib.book import build_html; build_html({str(book)!r}, jobs=2)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "UBW_PROFILE": "smoke", "MPLBACKEND": "Agg"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "2 page(s) at a time" in log and "doing serial" not in log
    readers = []
    for name in pages:
        found = re.findall(r"read by (\d+)", (book / "_build" / "html" / f"{name}.html").read_text())
        assert len(found) == 1, name
        readers.append(int(found[0]))
    # not the main process: Sphinx's parallel workers (7 pages in chunks of 3), at least two of them
    main = int(re.search(r"main (\d+)", log).group(1))
    assert main not in readers and len(set(readers)) >= 2


# ------------------------------------------------------------------------------------------ the built book
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The small book, built; returns its HTML folder."""
    if not JUPYTER_BOOK.exists():
        pytest.skip(f"jupyter-book is not installed next to {sys.executable} (pip install -e '.[book]')")
    tmp = tmp_path_factory.mktemp("book-render")
    book = tmp / "book"
    book.mkdir()
    (tmp / "ubwlib").symlink_to(ROOT / "ubwlib")  # the chapters' literalinclude ../ubwlib/...
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    shutil.copytree(ROOT / "book" / "_static", book / "_static")
    for name in ("intro", CHAPTER):
        shutil.copy(ROOT / "book" / f"{name}.md", book / f"{name}.md")
    (book / "tables.md").write_text(TABLES_PAGE, encoding="utf-8")
    (book / "_toc.yml").write_text(f"format: jb-book\nroot: intro\nchapters:\n  - file: {CHAPTER}\n"
                                   "  - file: tables\n")
    env = {**os.environ, "UBW_PROFILE": "smoke", "MPLBACKEND": "Agg"}
    env.pop("TQDM_DISABLE", None)  # the library itself must keep progress bars out of the pages
    proc = subprocess.run([str(JUPYTER_BOOK), "build", "--keep-going", str(book)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    warnings = [line for line in log.splitlines() if "WARNING" in line and "IPKernelApp" not in line
                and not PARTIAL_BOOK.search(line)]
    assert not warnings, "\n".join(warnings)
    return book / "_build" / "html"


def _page_checks(html: str, where: str) -> None:
    """What no page may show, in the built HTML or the rendered DOM."""
    bs4 = pytest.importorskip("bs4")
    soup = bs4.BeautifulSoup(html, "html.parser")
    for table in soup.find_all("table"):
        assert not re.search(r"\bNaN\b|\bnan\b", table.get_text(" ")), f"{where}: NaN in a table: {table}"
    outputs = " ".join(o.get_text(" ") for o in soup.select("div.cell_output"))
    for bad in ("IProgress", "TqdmWarning", "Warning", "Traceback"):
        assert bad not in outputs, f"{where}: {bad!r} in a cell output"
    assert not soup.select(".stderr"), f"{where}: stderr output: {soup.select('.stderr')[0]}"


def test_built_pages_are_self_contained_and_clean(site):
    bs4 = pytest.importorskip("bs4")
    assert (site / "_static" / "mathjax" / "tex-mml-chtml.js").is_file()
    assert (site / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    for page in ("intro", CHAPTER, "tables"):
        html = (site / f"{page}.html").read_text(encoding="utf-8")
        _page_checks(html, f"{page}.html")
        soup = bs4.BeautifulSoup(html, "html.parser")
        remote = [t.get("src") or t.get("href") for t in soup.select("script[src], link[rel=stylesheet]")
                  if re.match(r"^(https?:)?//", t.get("src") or t.get("href"))]
        assert not remote, f"{page}.html loads {remote}"
        assert soup.select('link[href^="_static/ubw-book.css"]'), "the book's CSS (code lines wrap) is not linked"
    page = (site / f"{CHAPTER}.html").read_text(encoding="utf-8")
    assert 'src="_static/mathjax/tex-mml-chtml.js"' in page
    tables = (site / "tables.html").read_text(encoding="utf-8")
    assert tables.count(f">{NA_REP}<") >= 6 and "ours (smoke)" in tables


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _chromium(url: str, profile_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium with no network: every host name fails to resolve (the loopback server aside)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={profile_dir}",
           "--virtual-time-budget=15000", *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    failed = re.search(r"Page load failed.*", proc.stderr)
    assert proc.returncode == 0 and not failed, (failed and failed.group(0)) or proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("via", ["file", "http"])
def test_rendered_page_has_typeset_math_and_clean_tables(site, request, tmp_path, via):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    bs4 = pytest.importorskip("bs4")
    base = (site.as_uri() if via == "file" else request.getfixturevalue("server"))
    for page in (CHAPTER, "tables") if via == "file" else (CHAPTER,):
        dom = _chromium(f"{base}/{page}.html", tmp_path / f"chromium-{page}", "--dump-dom").stdout
        soup = bs4.BeautifulSoup(dom, "html.parser")
        _page_checks(dom, f"{page} ({via})")
        if page == CHAPTER:
            maths = soup.select(".math")
            assert len(maths) > 20, "the chapter's formulas are missing"
            raw = [m for m in maths if not m.find("mjx-container")]
            assert not raw, f"MathJax did not typeset {len(raw)} of {len(maths)} formulas, e.g. {raw[0]}"
            assert not soup.find("mjx-merror"), f"a TeX error: {soup.find('mjx-merror')}"
            for tag in soup(["script", "style", "pre", "code"]):
                tag.decompose()
            text = soup.get_text(" ")
            for delimiter in ("\\(", "\\[", "$$"):
                assert delimiter not in text, f"raw math ({delimiter!r}) in the rendered page"
        else:
            assert "ours (smoke)" in soup.get_text(" ")
    if via == "file":  # a picture of the chapter, for a person to look at (the test's tmp folder)
        png = tmp_path / f"{CHAPTER}.png"
        _chromium(f"{base}/{CHAPTER}.html", tmp_path / "chromium-shot", "--window-size=1280,2400",
                  f"--screenshot={png}")
        assert png.stat().st_size > 20_000
