"""Stored results (issue 12): the registry of chapter tables, storing with provenance, loading (missing, stale),
the three-column display, the claims on live and stored results, and ``make results`` end to end on smoke."""

from __future__ import annotations

import json
import math

import nbformat
import numpy as np
import pandas as pd
import pytest

from ubwlib.book import chapter_paths, store_results
from ubwlib.experiments import get_profile
from ubwlib.experiments.paper import TABLE1_CIFAR10, paper_verification
from ubwlib.experiments.stored import (
    CHAPTERS,
    TABLES,
    claim_inputs,
    chapter_table,
    chapter_tables,
    claims_where,
    load_stored,
    record_chapter,
    store_table,
    table_hash,
    three_columns,
    unstored_since,
)

SMOKE = get_profile("smoke")


def _hand_table() -> pd.DataFrame:
    return pd.DataFrame({"BA": [0.9, 0.85], "ASR-A": [math.nan, 0.5], "ASR-C": [math.nan, 0.25], "D_p": [math.nan, 1.5],
                         "eval set": ["test, clean", "test, all classes"], "n eval": [500, 500],
                         "targeted": [False, False]},
                        index=pd.Index(["No Attack", "UBW-P"], name="Method"))


# --------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------


def test_registry_covers_the_chapters_in_gpu_order():
    assert CHAPTERS == ("ubw_p", "ubw_c", "verification", "targeted", "defenses", "ablations", "report")
    book = {p.stem for p in chapter_paths()}
    assert set(CHAPTERS) <= book
    for c in CHAPTERS:
        specs = chapter_tables(c)
        assert specs and all(s.chapter == c and s.id == f"{c}/{s.name}" for s in specs)
    assert set(claim_inputs()) <= set(TABLES)
    with pytest.raises(ValueError, match="chapters with tables: ubw_p"):
        chapter_tables("intro")
    with pytest.raises(ValueError, match="its tables: table1"):
        chapter_table("ubw_p", "nope", SMOKE)


def test_every_registered_table_is_computed_by_its_chapter():
    """The stored table must be the one the chapter shows: each chapter computes each of its registered tables
    through chapter_table (checked again at run time by ``make results``)."""
    for spec in TABLES.values():
        text = next(p for p in chapter_paths() if p.stem == spec.chapter).read_text()
        literal = f'chapter_table("{spec.chapter}", "{spec.name}"'
        templated = f'chapter_table("{spec.chapter}", f"{spec.name.split("-")[0]}-{{m}}"'
        assert literal in text or templated in text, spec.id


def test_table_hash_follows_the_settings_not_the_wording():
    spec = TABLES["ubw_c/table1"]
    h = table_hash(spec, SMOKE)
    assert h == table_hash(spec, get_profile("smoke")) and len(h) == 64
    assert table_hash(spec, SMOKE.replace(description="reworded")) == h
    assert table_hash(spec, SMOKE.replace(data_root="/elsewhere")) == h
    assert table_hash(spec, get_profile("smoke", crafting={"steps": 5})) != h  # UBW-C's budget
    assert table_hash(spec, get_profile("smoke", train={"epochs": 5})) != h
    assert table_hash(TABLES["ubw_p/table1"], SMOKE) != table_hash(TABLES["targeted/table1"], SMOKE)


# --------------------------------------------------------------------------------------------------
# store / load
# --------------------------------------------------------------------------------------------------


def test_store_and_load_round_trip_with_provenance(tmp_path):
    spec = TABLES["ubw_p/table1"]
    table = _hand_table()
    path = store_table(spec, SMOKE, table, tmp_path / "smoke", seconds=1.234, command="make results", via="recipes")
    assert path == tmp_path / "smoke" / "ubw_p" / "table1.json"
    assert (tmp_path / "smoke" / "ubw_p" / "table1.csv").read_text().startswith("Method,BA,ASR-A")
    assert path.stat().st_size < 8000  # a few KB
    s = load_stored("ubw_p", "table1", "smoke", root=tmp_path)
    assert not s.missing and s.current is True
    pd.testing.assert_frame_equal(s.table, table)  # exactly: dtypes, index name, NaN
    p = s.provenance
    assert p["settings hash"] == table_hash(spec, SMOKE) and p["via"] == "recipes" and p["command"] == "make results"
    assert p["wall seconds"] == 1.2 and p["profile"] == "smoke" and p["table"] == "ubw_p/table1"
    for key in ("commit", "dirty", "date", "machine", "torch", "python"):
        assert key in p
    assert s.label == "smoke (stored)" and "make results" in s.note() and "STALE" not in s.note()
    # the chapter's wall time joins the table's provenance and the manifest
    record_chapter(tmp_path / "smoke", "ubw_p", 12.34, via="recipes", command="make results")
    assert load_stored("ubw_p", "table1", "smoke", root=tmp_path).provenance["chapter seconds"] == 12.3
    manifest = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    assert manifest["chapters"]["ubw_p"]["seconds"] == 12.3 and manifest["chapters"]["ubw_p"]["tables"] == ["table1"]


def test_missing_and_stale_tables_are_flagged(tmp_path, monkeypatch):
    s = load_stored("ubw_p", "table1", "full", root=tmp_path)
    assert s.missing and s.table is None and s.current is None
    assert "missing" in s.note() and "make results PROFILE=full CHAPTERS=ubw_p" in s.note()
    # $UBW_STORED_RESULTS is where the book looks when no root is given
    monkeypatch.setenv("UBW_STORED_RESULTS", str(tmp_path))
    store_table(TABLES["ubw_p/table1"], SMOKE, _hand_table(), tmp_path / "smoke", seconds=1, command="c", via="recipes")
    assert load_stored("ubw_p", "table1", "smoke").current is True
    # the settings changed since: flagged, still shown
    longer = get_profile("smoke", train={"epochs": 5})
    stale = load_stored("ubw_p", "table1", longer)
    assert stale.current is False and not stale.missing
    assert "STALE" in stale.note() and stale.label == "smoke (stored, stale)"
    # a stored table whose hash was computed by other code
    path = tmp_path / "smoke" / "ubw_p" / "table1.json"
    doc = json.loads(path.read_text())
    doc["provenance"]["settings hash"] = "0" * 64
    path.write_text(json.dumps(doc))
    assert load_stored("ubw_p", "table1", "smoke").current is False
    # a damaged file is a clear error that names the fix
    path.write_text("{not json")
    with pytest.raises(ValueError, match="delete it and rerun `make results PROFILE=smoke CHAPTERS=ubw_p`"):
        load_stored("ubw_p", "table1", "smoke")


def test_unstored_since_lists_what_a_chapter_did_not_write(tmp_path):
    import time

    t0 = time.time()
    assert unstored_since(tmp_path, "ubw_c", t0) == ["ubw_c/table1", "ubw_c/source", "ubw_c/noise-control"]
    store_table(TABLES["ubw_c/source"], SMOKE, _hand_table(), tmp_path, seconds=1, command="c", via="papermill")
    assert unstored_since(tmp_path, "ubw_c", t0) == ["ubw_c/table1", "ubw_c/noise-control"]
    assert unstored_since(tmp_path, "ubw_c", t0 + 3600) == ["ubw_c/table1", "ubw_c/source", "ubw_c/noise-control"]


# --------------------------------------------------------------------------------------------------
# the three columns
# --------------------------------------------------------------------------------------------------


def test_three_columns_hand_computed(tmp_path):
    live = _hand_table()
    stored = _hand_table().assign(BA=[0.8, 0.7])
    store_table(TABLES["ubw_p/table1"], SMOKE, stored, tmp_path / "smoke", seconds=1, command="c", via="recipes")
    c = three_columns(live, load_stored("ubw_p", "table1", "smoke", root=tmp_path), TABLE1_CIFAR10,
                      ["BA", "D_p"], live_profile="default")
    t = c.table
    assert list(t.columns) == [("BA", "paper (CIFAR-10)"), ("BA", "smoke (stored)"), ("BA", "default (live)"),
                               ("D_p", "paper (CIFAR-10)"), ("D_p", "smoke (stored)"), ("D_p", "default (live)")]
    assert list(t.index) == ["No Attack", "UBW-P"]
    assert t.loc["UBW-P", ("BA", "paper (CIFAR-10)")] == 90.59           # the paper's, in %
    assert t.loc["UBW-P", ("BA", "smoke (stored)")] == pytest.approx(70.0)  # fractions shown in %
    assert t.loc["UBW-P", ("BA", "default (live)")] == pytest.approx(85.0)
    assert t.loc["UBW-P", ("D_p", "default (live)")] == 1.5                 # D_p as is
    assert math.isnan(t.loc["No Attack", ("D_p", "paper (CIFAR-10)")])
    assert c.notes[0].startswith("paper (CIFAR-10)") and c.notes[1].startswith("smoke (stored): ")
    html = c._repr_html_()
    assert "smoke (stored)" in html and "missing" not in html and "70.00" in html


def test_three_columns_show_missing_as_missing(tmp_path):
    live = _hand_table()
    c = three_columns(live, load_stored("ubw_p", "table1", "full", root=tmp_path),
                      {"paper (CIFAR-10)": TABLE1_CIFAR10, "paper (ImageNet)": TABLE1_CIFAR10}, ["ASR-A"],
                      live_profile=SMOKE)
    assert c.table[("ASR-A", "full (stored)")].isna().all()       # never filled in
    assert c.table.columns.get_level_values(1).tolist() == ["paper (CIFAR-10)", "paper (ImageNet)", "full (stored)",
                                                            "smoke (live)"]
    html = c._repr_html_()
    assert html.count(">missing<") == 2 and "make results PROFILE=full" in html


def test_three_columns_formats_p_values():
    live = pd.DataFrame({"Delta P": [0.7], "p-value": [1.5e-20], "verdict": ["watermarked"]},
                        index=pd.Index(["Malicious"], name="scenario"))
    from ubwlib.experiments.stored import Stored

    missing = Stored("verification", "scenarios-ubw-p", "full", __import__("pathlib").Path("/nonexistent"))
    c = three_columns(live, missing, paper_verification("ubw-p"), ["Delta P", "p-value", "verdict"],
                      live_profile=SMOKE, precision=4, formats={"p-value": "{:.2e}"})
    html = c._repr_html_()
    assert "1.50e-20" in html and "1.00e-36" in html and "0.7568" in html and "watermarked" in html


# --------------------------------------------------------------------------------------------------
# claims on live and stored results
# --------------------------------------------------------------------------------------------------


def test_claims_where_without_stored_results(tmp_path):
    live = pd.DataFrame({"claim": ["a", "b"], "paper's evidence": ["x", "y"], "ours": ["1", "2"],
                         "verdict": ["holds", "does not hold"], "chapter": ["ubw_p", "ubw_c"]},
                        index=pd.Index(["ubw-p/a", "ubw-c/b"], name="id"))
    where, notes = claims_where(live, "full", root=tmp_path)
    assert list(where["full: verdict"]) == ["not stored", "not stored"]
    assert list(where["holds where"]) == ["live", "neither (full scale not stored)"]
    assert "missing" in notes[0] and "make results PROFILE=full" in notes[0]


# --------------------------------------------------------------------------------------------------
# make results, end to end on the smoke profile
# --------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_cpu_thread")
def test_make_results_smoke_recipes_then_the_claims_on_both(tmp_path):
    """Every chapter's tables stored through the recipes (no Jupyter); stored and live agree on the same
    profile, so every claim holds either on both or on neither."""
    done = store_results("smoke", root=tmp_path, via="recipes")
    assert [c for c, _ in done] == list(CHAPTERS)
    for spec in TABLES.values():
        s = load_stored(spec.chapter, spec.name, "smoke", root=tmp_path)
        assert not s.missing and s.current, spec.id
        assert s.provenance["chapter seconds"] >= s.provenance["wall seconds"] - 0.1
    manifest = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    assert set(manifest["chapters"]) == set(CHAPTERS)
    live = chapter_table("report", "claims", SMOKE, store=False)
    pd.testing.assert_frame_equal(load_stored("report", "claims", "smoke", root=tmp_path).table, live)
    where, notes = claims_where(live, "smoke", root=tmp_path)
    assert (where["live: ours"] == where["smoke: ours"]).all()
    assert set(where["holds where"]) <= {"both", "neither"}
    assert ((where["holds where"] == "both") == (live["verdict"] == "holds")).all()
    assert len(notes) == len(claim_inputs()) and all("smoke (stored)" in n for n in notes)
    t1 = chapter_table("ubw_p", "table1", SMOKE, store=False)
    c = three_columns(t1, load_stored("ubw_p", "table1", "smoke", root=tmp_path), TABLE1_CIFAR10, ["BA", "D_p"],
                      live_profile=SMOKE).table
    np.testing.assert_array_equal(c[("BA", "smoke (stored)")].values, c[("BA", "smoke (live)")].values)


@pytest.mark.usefixtures("one_cpu_thread")
def test_make_results_through_papermill_and_the_chapter_pointed_at_them(tmp_path):
    """``make results PROFILE=smoke CHAPTERS=ubw_p``: the chapter runs through papermill and stores its table;
    the same chapter pointed at the stored smoke results shows them beside the live ones."""
    from ubwlib.book import run_chapters

    store_results("smoke", ["ubw_p"], root=tmp_path, via="papermill", notebooks=tmp_path / "nb")
    s = load_stored("ubw_p", "table1", "smoke", root=tmp_path)
    assert s.current and s.provenance["via"] == "papermill" and s.provenance["chapter seconds"] > 0
    run_chapters("smoke", out_dir=tmp_path / "pointed", chapters=["ubw_p"],
                 extra_parameters={"stored_profile": "smoke", "results_root": str(tmp_path)})
    nb = nbformat.read(tmp_path / "pointed" / "ubw_p.ipynb", as_version=4)
    html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" and "three_columns(" in c.source
            for o in c.outputs if "text/html" in o.get("data", {})]
    assert len(html) == 1
    assert "smoke (stored)" in html[0] and "smoke (live)" in html[0] and ">missing<" not in html[0]
    ba = f"{100 * s.table.loc['UBW-P', 'BA']:.2f}"
    assert html[0].count(ba) >= 2  # the stored and the live BA of UBW-P, the same number


def test_provenance_outside_a_git_checkout_takes_the_commit_from_ubw_commit(monkeypatch):
    """A lent GPU machine gets the working tree without .git: the commit comes from UBW_COMMIT, and whether the files
    differed from it is unknown (None), not 'dirty'."""
    from ubwlib.experiments import provenance as P

    monkeypatch.setattr(P, "git", lambda *args: "unknown")
    monkeypatch.delenv(P.COMMIT_ENV, raising=False)
    assert P.provenance("x")["commit"] == "unknown" and P.provenance("x")["dirty"] is None
    monkeypatch.setenv(P.COMMIT_ENV, " 0123abcd ")
    p = P.provenance("make results", seconds=2.25)
    assert p["commit"] == "0123abcd" and p["dirty"] is None and p["wall seconds"] == 2.2
    monkeypatch.setattr(P, "git", lambda *args: "feedbeef" if args[0] == "rev-parse" else "")
    assert P.provenance("x")["commit"] == "feedbeef" and P.provenance("x")["dirty"] is False  # git wins
