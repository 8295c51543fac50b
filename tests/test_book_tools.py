"""Tests of ubwlib.book (chapter discovery and nbval conversion) and of the book's configuration files."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
import pytest
import yaml

from ubwlib.book import BOOK_DIR, _is_notebook, chapter_paths, read_chapter, write_test_notebook

ROOT = Path(__file__).resolve().parent.parent

HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""


def chapter_md(title: str, parameters: bool = True) -> str:
    params = (
        "```{code-cell} ipython3\n:tags: [parameters]\n\nprofile = None\nn = 3\n```\n\n" if parameters else ""
    )
    return (
        f"{HEADER}\n# {title}\n\nSome text.\n\n{params}"
        "```{code-cell} ipython3\nx = n + 1\n```\n\nMore text.\n\n"
        "```{code-cell} ipython3\n:tags: [hide-input]\n\nprint(profile, x)\n```\n"
    )


def _toc_files(node) -> list[str]:
    """Every root/file of a _toc.yml, in order (an independent reading of the table of contents)."""
    out: list[str] = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                out.append(node[key])
        for key in ("parts", "chapters", "sections"):
            out += _toc_files(node.get(key, []))
    elif isinstance(node, list):
        for item in node:
            out += _toc_files(item)
    return out


def _parameters_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]


def _assigned_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


# --------------------------------------------------------------------------------------------------
# the real book
# --------------------------------------------------------------------------------------------------


def test_chapter_paths_follow_the_toc():
    chapters = chapter_paths()
    assert chapters, "the book has no executable chapter"
    toc = yaml.safe_load((BOOK_DIR / "_toc.yml").read_text())
    listed = [BOOK_DIR / (f if f.endswith(".md") else f + ".md") for f in _toc_files(toc)]
    assert all(p.exists() for p in listed), [p for p in listed if not p.exists()]
    assert chapters == [p for p in listed if _is_notebook(p)]
    assert BOOK_DIR / "dispersibility.md" in chapters
    assert BOOK_DIR / "intro.md" not in chapters  # plain Markdown, not a notebook
    assert chapter_paths(str(BOOK_DIR)) == chapters


def test_every_chapter_has_one_parameters_cell_assigning_profile():
    for md in chapter_paths():
        nb = read_chapter(md)
        cells = _parameters_cells(nb)
        assert len(cells) == 1, f"{md.name}: {len(cells)} cells tagged 'parameters'"
        assert "profile" in _assigned_names(cells[0].source), md.name
        # the parameters cell comes before any code that could use the profile
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert first_code is cells[0], md.name


def test_write_test_notebook_for_the_real_chapters(tmp_path):
    for md in chapter_paths():
        original = read_chapter(md)
        out = write_test_notebook(md, tmp_path / "nested" / f"{md.stem}.ipynb", {"profile": "smoke"})
        assert out == tmp_path / "nested" / f"{md.stem}.ipynb" and out.is_file()
        nb = nbformat.read(str(out), as_version=4)
        nbformat.validate(nb)
        assert len(nb.cells) == len(original.cells) + 1
        idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        injected = nb.cells[idx + 1]
        assert injected.cell_type == "code" and injected.source == "profile = 'smoke'"
        assert "injected-parameters" in injected.metadata["tags"]
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.metadata["tags"].count("nbval-ignore-output") == 1
        ns: dict = {}
        exec(nb.cells[idx].source + "\n" + injected.source, ns)
        assert ns["profile"] == "smoke"


# --------------------------------------------------------------------------------------------------
# a synthetic book
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def book(tmp_path) -> Path:
    d = tmp_path / "book"
    d.mkdir()
    (d / "intro.md").write_text("# Intro\n\nNot a notebook.\n")
    for name in ("zeta", "alpha", "mid", "sub", "unlisted"):
        (d / f"{name}.md").write_text(chapter_md(name))
    (d / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nparts:\n"
        "  - caption: One\n    chapters:\n      - file: zeta\n      - file: alpha\n        sections:\n"
        "          - file: sub.md\n"
        "  - caption: Two\n    chapters:\n      - file: missing\n      - file: mid\n"
    )
    return d


def test_chapter_paths_synthetic_order(book):
    # toc order, not alphabetical; plain Markdown, missing and unlisted files left out; ".md" accepted
    assert chapter_paths(book) == [book / "zeta.md", book / "alpha.md", book / "sub.md", book / "mid.md"]


def test_chapter_paths_without_toc_is_sorted(book):
    (book / "_toc.yml").unlink()
    names = [p.stem for p in chapter_paths(book)]
    assert names == ["alpha", "mid", "sub", "unlisted", "zeta"]


def test_write_test_notebook_injects_after_parameters(book, tmp_path):
    out = write_test_notebook(book / "alpha.md", tmp_path / "out" / "alpha.ipynb", {"profile": "smoke", "n": 5})
    nb = nbformat.read(str(out), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.source for c in code] == [
        "profile = None\nn = 3",
        "profile = 'smoke'\nn = 5",
        "x = n + 1",
        "print(profile, x)",
    ]
    assert "parameters" in code[0].metadata["tags"]
    assert code[1].metadata["tags"] == ["injected-parameters", "nbval-ignore-output"]
    assert code[3].metadata["tags"] == ["hide-input", "nbval-ignore-output"]
    assert all("nbval-ignore-output" in c.metadata["tags"] for c in code)
    for c in nb.cells:
        if c.cell_type == "markdown":
            assert "nbval-ignore-output" not in c.metadata.get("tags", [])
    # the injected cell directly follows the parameters cell in the full cell list too
    i = nb.cells.index(code[0])
    assert nb.cells[i + 1] is code[1]
    # rerunning overwrites (idempotent, no duplicated tags)
    write_test_notebook(book / "alpha.md", out, {"profile": "smoke", "n": 5})
    again = nbformat.read(str(out), as_version=4)
    strip = lambda cells: [(c.cell_type, c.source, c.metadata) for c in cells]  # noqa: E731 (ids are random)
    assert strip(again.cells) == strip(nb.cells)


def test_chapter_without_parameters_cell_raises(tmp_path):
    md = tmp_path / "noparams.md"
    md.write_text(chapter_md("noparams", parameters=False))
    assert _is_notebook(md)
    with pytest.raises(ValueError, match="parameters"):
        write_test_notebook(md, tmp_path / "noparams.ipynb", {"profile": "smoke"})
    assert not (tmp_path / "noparams.ipynb").exists()


# --------------------------------------------------------------------------------------------------
# configuration files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["_config.yml", "_toc.yml"])
def test_book_config_files_are_symlinks_to_the_root(name):
    link = ROOT / "book" / name
    assert link.is_symlink()
    assert link.resolve() == (ROOT / name).resolve()
    assert not (ROOT / name).is_symlink() and (ROOT / name).is_file()
    assert not os.path.isabs(os.readlink(link))  # relative: survives a moved checkout


def test_config_executes_every_chapter_and_fails_on_errors():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    ex = cfg["execute"]
    assert ex["execute_notebooks"] == "force"
    assert ex["raise_on_error"] is True
    assert ex.get("allow_errors", False) is False
    assert isinstance(ex["timeout"], int) and ex["timeout"] >= 3600


def test_toc_root_and_chapters_exist():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    assert toc["format"] == "jb-book" and toc["root"] == "intro"
    for f in _toc_files(toc):
        assert (BOOK_DIR / (f if f.endswith(".md") else f + ".md")).is_file(), f


def test_papermill_run_of_a_chapter(tmp_path):
    """The documented papermill path (jupytext.read -> papermill) runs a chapter with injected parameters."""
    import nbformat

    from ubwlib.book import run_chapters

    timings = run_chapters("smoke", tmp_path, chapters=["dispersibility"], extra_parameters={"n_random_sets": 40})
    assert [name for name, _ in timings] == ["dispersibility"]
    nb = nbformat.read(str(tmp_path / "dispersibility.ipynb"), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "profile = \"smoke\"" in injected[0].source.replace("'", '"')
    assert "n_random_sets = 40" in injected[0].source
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert not (tmp_path / "dispersibility.input.ipynb").exists()
