"""Stored results: every table a chapter computes, written under ``results/<profile>/`` with its provenance, and
shown beside the paper's number and the live one (issue 12).

The book runs on the ``default`` profile (2 CPU cores); some of the paper's effects cannot appear at that scale.
A profile that needs a GPU (``full``) is run once where a GPU is, chapter by chapter, and its tables are stored
as small files that are committed; the book then shows three columns wherever it shows a number the paper
reports: the paper's, the stored full-scale one, and the one computed live on this machine's profile.

- :data:`TABLES`: the registry, one :class:`TableSpec` per (chapter, table); the chapter computes the table by
  :func:`chapter_table`, so the stored table is the one the chapter shows.
- ``make results PROFILE=... [CHAPTERS=...]`` (:func:`ubwlib.book.store_results`) runs the chapters through
  papermill, and each :func:`chapter_table` call of a chapter stores its table; ``--via recipes`` calls the
  registered recipes directly (:func:`store_chapter`: no Jupyter needed, e.g. on a GPU machine).
- :func:`load_stored`: a stored table with its provenance, ``missing`` when absent (never filled in) and
  ``current`` False when the settings it was computed with (:func:`table_hash`) differ from the current code's.
- :func:`three_columns`: paper / stored / live side by side; :func:`claims_where`: every claim of the paper
  (:mod:`ubwlib.experiments.claims`) on the live profile and on the stored results.

Files: ``results/<profile>/<chapter>/<table>.json`` (the table, exactly, and its provenance), a ``.csv`` beside it
for readers, and ``results/<profile>/manifest.json`` (wall time per chapter).
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from ..cache import settings_hash, table_from_data, table_to_data, write_text_atomic
from .profiles import PROFILES, Profile
from .provenance import REPO_ROOT, provenance

__all__ = ["RESULTS_ROOT", "STORE_ENV", "READ_ENV", "CHAPTERS", "TableSpec", "TABLES", "chapter_tables",
           "table_settings", "table_hash", "chapter_table", "store_table", "Stored", "load_stored", "three_columns",
           "Comparison", "claims_where", "claim_inputs", "store_chapter", "unstored_since",
           "record_chapter", "NA_REP", "frame_html", "book_display"]

#: Where stored results live: ``results/<profile>/``.
RESULTS_ROOT = REPO_ROOT / "results"
#: Set (to a profile's results folder) while chapters run for ``make results``: :func:`chapter_table` stores there.
STORE_ENV = "UBW_STORE_RESULTS"
#: The command recorded in the provenance of tables stored through papermill (set by :func:`run_results`).
COMMAND_ENV = "UBW_RESULTS_COMMAND"
#: Where the book reads stored results from (default :data:`RESULTS_ROOT`).
READ_ENV = "UBW_STORED_RESULTS"
#: The chapters with stored tables, in the order a GPU session runs them (each reads what the earlier computed).
CHAPTERS = ("ubw_p", "ubw_c", "verification", "targeted", "defenses", "ablations", "report")
#: Rates stored as fractions and shown in % (the paper's tables are in %).
RATES = ("BA", "ASR-A", "ASR-C", "ASR (targeted)")


@dataclass(frozen=True)
class TableSpec:
    """One table of a chapter: how it is computed on a profile and which methods' settings it depends on."""

    chapter: str
    name: str
    compute: Callable[[Profile], pd.DataFrame]
    methods: tuple[str, ...]
    what: str

    @property
    def id(self) -> str:
        return f"{self.chapter}/{self.name}"


# ----------------------------------------------------------------------------------------------- the recipes
def _table1(methods: str) -> Callable[[Profile], pd.DataFrame]:
    def compute(P: Profile) -> pd.DataFrame:
        from .watermarking import ALL_METHODS, POISONED_LABEL_METHODS, table1

        chosen = {"poisoned": POISONED_LABEL_METHODS, "all": ALL_METHODS, "targeted": _TARGETED}[methods]
        return table1(P, chosen)

    return compute


def _source(P: Profile) -> pd.DataFrame:
    from .watermarking import source_table

    return source_table(P)


def _noise_control(P: Profile) -> pd.DataFrame:
    from .watermarking import noise_control_table

    return noise_control_table(P)


def _scenarios(method: str) -> Callable[[Profile], pd.DataFrame]:
    def compute(P: Profile) -> pd.DataFrame:
        from .verification import scenario_table, verification_settings

        return scenario_table(P, method, settings=verification_settings(P))

    return compute


def _false_positives(P: Profile) -> pd.DataFrame:
    from .verification import VERIFY_METHODS, false_positive_table, verification_settings

    V = P.verification
    return pd.concat({m: false_positive_table(P, m, n_triggers=V.false_positive_triggers,
                                              n_models=V.false_positive_models, settings=verification_settings(P))
                      for m in VERIFY_METHODS}, names=["method"])


def _defense(kind: str) -> Callable[[Profile], pd.DataFrame]:
    def compute(P: Profile) -> pd.DataFrame:
        from .robustness import DEFENSE_METHODS, default_fine_tuning, fine_tuning_table, pruning_table, strip_table

        if kind == "strip":
            return strip_table(P)
        if kind == "fine-tuning":
            parts = [fine_tuning_table(P, m, settings=default_fine_tuning(P)) for m in DEFENSE_METHODS]
        else:
            parts = [pruning_table(P, m) for m in DEFENSE_METHODS]
        return pd.concat(parts, ignore_index=True)

    return compute


def _sweep(kind: str) -> Callable[[Profile], pd.DataFrame]:
    def compute(P: Profile) -> pd.DataFrame:
        from .ablations import ablation_claims, ablation_grid, benign_baseline, gamma_sweep, lambda_sweep

        G = ablation_grid(P)
        if kind == "gamma":
            return gamma_sweep(P, methods=tuple(G["gammas"]), gammas=G["gammas"])
        if kind == "lambda":
            return lambda_sweep(P, lambdas=G["lambdas"])
        return ablation_claims(chapter_table("ablations", "gamma-sweep", P, store=False),
                               chapter_table("ablations", "lambda-sweep", P, store=False),
                               benign_baseline(P, methods=tuple(G["gammas"])))

    return compute


def _claims(P: Profile) -> pd.DataFrame:
    from .claims import evaluate

    return evaluate({i: chapter_table(*i.split("/"), P, store=False) for i in claim_inputs()}, profile=P)


def _seed_runs(P: Profile) -> pd.DataFrame:
    from .report import seed_runs

    return seed_runs(P, seeds=P.seeds)


_TARGETED = ("badnets", "blended", "wanet")
_SPECS = [
    TableSpec("ubw_p", "table1", _table1("poisoned"), ("badnets", "blended", "wanet", "ubw-p"),
              "Table 1, poisoned-label rows: BA, ASR-A, ASR-C (fractions), D_p"),
    TableSpec("ubw_c", "table1", _table1("all"),
              ("badnets", "blended", "wanet", "ubw-p", "label-consistent", "sleeper-agent", "ubw-c"),
              "Table 1, all eight rows"),
    TableSpec("ubw_c", "source", _source, ("sleeper-agent", "ubw-c"),
              "Sleeper Agent and UBW-C on the triggered source-class test images, each beside the benign model"),
    TableSpec("ubw_c", "noise-control", _noise_control, ("ubw-c",),
              "UBW-C beside the benign model and the same poisons with random noise (0 crafting steps)"),
    TableSpec("verification", "scenarios-ubw-p", _scenarios("ubw-p"), ("ubw-p",),
              "Table 3: Delta P and p-value of Independent-T, Independent-M and Malicious"),
    TableSpec("verification", "scenarios-ubw-c", _scenarios("ubw-c"), ("ubw-c",),
              "Table 4: Delta P and p-value of Independent-T, Independent-M and Malicious"),
    TableSpec("verification", "false-positives", _false_positives, ("ubw-p", "ubw-c"),
              "Independent cases that must not be flagged"),
    TableSpec("targeted", "table1", _table1("targeted"), _TARGETED, "Table 1, targeted rows"),
    TableSpec("defenses", "fine-tuning", _defense("fine-tuning"), ("ubw-p", "ubw-c"), "Figure 6: fine-tuning"),
    TableSpec("defenses", "pruning", _defense("pruning"), ("ubw-p", "ubw-c"), "Figure 7: pruning"),
    TableSpec("defenses", "strip", _defense("strip"), ("badnets", "ubw-p", "ubw-c"), "STRIP"),
    TableSpec("ablations", "gamma-sweep", _sweep("gamma"), ("ubw-p", "ubw-c"), "Figure 4: the poisoning rate"),
    TableSpec("ablations", "lambda-sweep", _sweep("lambda"), ("ubw-c",), "Figure 5: lambda"),
    TableSpec("ablations", "claims", _sweep("claims"), ("ubw-p", "ubw-c"), "The paper's claims about Figures 4-5"),
    TableSpec("report", "claims", _claims,
              ("badnets", "blended", "wanet", "ubw-p", "label-consistent", "sleeper-agent", "ubw-c"),
              "Every claim of the paper's Section 5"),
    TableSpec("report", "seed-runs", _seed_runs, ("ubw-p", "ubw-c"), "The headline numbers over seeds"),
]
#: Every stored table, by ``"chapter/name"``.
TABLES: dict[str, TableSpec] = {s.id: s for s in _SPECS}


def chapter_tables(chapter: str) -> list[TableSpec]:
    """The registered tables of ``chapter`` (an unknown chapter is an error naming the known ones)."""
    if chapter not in CHAPTERS:
        raise ValueError(f"no stored tables for chapter {chapter!r}; chapters with tables: {', '.join(CHAPTERS)}")
    return [s for s in _SPECS if s.chapter == chapter]


def _spec(chapter: str, name: str) -> TableSpec:
    try:
        return TABLES[f"{chapter}/{name}"]
    except KeyError:
        known = ", ".join(s.name for s in chapter_tables(chapter))
        raise ValueError(f"chapter {chapter!r} has no table {name!r}; its tables: {known}") from None


# ----------------------------------------------------------------------------------------------- settings hash
def _method_settings(profile: Profile, method: str):
    from ..watermarks import get_watermark
    from .runs import method_settings

    return get_watermark(method, **method_settings(profile, method)).settings


def table_settings(spec: TableSpec, profile: Profile) -> dict:
    """Everything a stored table depends on that the code decides: the profile (its description and data folder
    aside), the settings of each method it involves on that profile, and the versions of the cached recipes and of
    the numerics (:data:`ubwlib.experiments.core.NUMERICS`)."""
    from .runs import VERSION as CLEAN_LABEL_VERSION
    from .core import NUMERICS, VERSIONS
    from .robustness import VERSION as ROBUSTNESS_VERSION
    from .verification import VERIFY_DRAW

    shape = {k: v for k, v in dataclasses.asdict(profile).items() if k not in ("description", "data_root", "stack")}
    return {"table": spec.id, "profile": shape, "methods": {m: _method_settings(profile, m) for m in spec.methods},
            "versions": {**VERSIONS, "clean-label": CLEAN_LABEL_VERSION, "robustness": ROBUSTNESS_VERSION,
                         "verification draw": VERIFY_DRAW, "numerics": NUMERICS}}


def table_hash(spec: TableSpec, profile: Profile) -> str:
    """The hash of :func:`table_settings` (the same canonical hash as the cache's keys)."""
    return settings_hash("stored-table", table_settings(spec, profile), "1")


# ----------------------------------------------------------------------------------------------- store / load
def chapter_table(chapter: str, name: str, profile: Profile, *, store: bool = True) -> pd.DataFrame:
    """The table ``name`` of ``chapter`` on ``profile``, computed by its registered recipe (cached recipes: a
    rebuild reads). While ``make results`` runs the chapter (``$UBW_STORE_RESULTS`` set to a profile's folder)
    the table is also stored there, with its provenance."""
    spec = _spec(chapter, name)
    t0 = time.perf_counter()
    table = spec.compute(profile)
    target = os.environ.get(STORE_ENV)
    if store and target:
        command = os.environ.get(COMMAND_ENV) or "papermill " + spec.chapter
        store_table(spec, profile, table, target, seconds=time.perf_counter() - t0, command=command, via="papermill")
    return table


def _paths(directory: Path, spec: TableSpec) -> tuple[Path, Path]:
    folder = directory / spec.chapter
    return folder / f"{spec.name}.json", folder / f"{spec.name}.csv"


def store_table(spec: TableSpec, profile: Profile, table: pd.DataFrame, directory: Path | str, *, seconds: float,
                command: str, via: str) -> Path:
    """Write ``table`` to ``directory/<chapter>/<name>.json`` (the table, exactly, with its provenance and the hash
    of the settings it was computed with) and a ``.csv`` beside it; returns the JSON's path. ``directory`` is a
    profile's folder (``results/<profile>``)."""
    directory = Path(directory)
    meta = {"table": spec.id, "what": spec.what, "profile": profile.name, "settings hash": table_hash(spec, profile),
            "via": via, **provenance(command, seconds)}
    json_path, csv_path = _paths(directory, spec)
    write_text_atomic(json_path, json.dumps({"provenance": meta, "data": table_to_data(table)}, indent=1) + "\n")
    write_text_atomic(csv_path, table.to_csv(float_format="%.6g"))
    return json_path


@dataclass
class Stored:
    """A stored table as the book reads it. ``table`` is None when it is ``missing``; ``current`` is False when
    the settings it was computed with differ from the current code's (or its profile no longer exists)."""

    chapter: str
    name: str
    profile: str
    path: Path
    table: pd.DataFrame | None = None
    provenance: dict = field(default_factory=dict)
    current: bool | None = None

    @property
    def missing(self) -> bool:
        return self.table is None

    @property
    def label(self) -> str:
        """The column header of the stored numbers."""
        return f"{self.profile} (stored{'' if self.missing or self.current else ', stale'})"

    def note(self) -> str:
        """One line: where the numbers come from, or that they are missing or stale."""
        if self.missing:
            return (f"{self.profile} (stored): missing, no file {self._shown_path()}; "
                    f"`make results PROFILE={self.profile} CHAPTERS={self.chapter}` stores it.")
        p = self.provenance
        secs = p.get("chapter seconds", p.get("wall seconds"))
        text = (f"{self.profile} (stored): {p.get('machine', '?')}, torch {p.get('torch', '?')}, "
                f"commit {str(p.get('commit', '?'))[:10]}{' (dirty)' if p.get('dirty') else ''}, "
                f"{p.get('date', '?')}, {secs if secs is not None else '?'} s, via {p.get('via', '?')}: "
                f"`{p.get('command', '?')}`")
        if not self.current:
            text += (". STALE: computed with settings that differ from the current code's; rerun "
                     f"`make results PROFILE={self.profile} CHAPTERS={self.chapter}`")
        return text

    def _shown_path(self) -> str:
        try:
            return str(self.path.relative_to(REPO_ROOT))
        except ValueError:
            return str(self.path)


def _read_root(root: Path | str | None) -> Path:
    return Path(root) if root is not None else Path(os.environ.get(READ_ENV) or RESULTS_ROOT)


def load_stored(chapter: str, name: str, profile: str | Profile = "full", root: Path | str | None = None) -> Stored:
    """The stored table ``chapter/name`` of ``profile`` under ``root`` (default ``$UBW_STORED_RESULTS``, else
    the repository's ``results/``). A missing file gives a :class:`Stored` with ``missing`` True."""
    spec = _spec(chapter, name)
    pname = profile.name if isinstance(profile, Profile) else str(profile)
    json_path, _ = _paths(_read_root(root) / pname, spec)
    out = Stored(chapter, name, pname, json_path)
    if not json_path.exists():
        return out
    try:
        doc = json.loads(json_path.read_text())
        out.table, out.provenance = table_from_data(doc["data"]), dict(doc["provenance"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path} is not a stored table ({e}); delete it and rerun "
                         f"`make results PROFILE={pname} CHAPTERS={chapter}`") from None
    prof = profile if isinstance(profile, Profile) else PROFILES.get(pname)
    out.current = prof is not None and out.provenance.get("settings hash") == table_hash(spec, prof)
    return out


# ----------------------------------------------------------------------------------------------- display
#: What the book's tables show where a value does not apply (NaN in the data, e.g. No Attack's ASR).
NA_REP = "–"


def frame_html(df: pd.DataFrame) -> str | None:
    """``df`` as a notebook shows it (pandas' HTML under the same ``display.*`` options), with :data:`NA_REP`
    instead of "NaN" where a value does not apply. The data are not changed."""
    if not pd.get_option("display.notebook_repr_html"):
        return None
    max_rows, min_rows = pd.get_option("display.max_rows"), pd.get_option("display.min_rows")
    if max_rows and min_rows and len(df) > max_rows:  # truncated: pandas shows min_rows rows
        max_rows = min(min_rows, max_rows)
    return df.to_html(na_rep=NA_REP, float_format=pd.get_option("display.float_format"),
                      max_rows=max_rows, max_cols=pd.get_option("display.max_columns"),
                      show_dimensions=pd.get_option("display.show_dimensions"), notebook=True)


def book_display() -> None:
    """The book's table display, called once by each chapter: every DataFrame a cell shows renders through
    :func:`frame_html`, and every Styler writes :data:`NA_REP` for missing values. Outside IPython only the
    Styler option is set."""
    pd.set_option("styler.format.na_rep", NA_REP)
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["text/html"].for_type(pd.DataFrame, frame_html)


@dataclass
class Comparison:
    """Paper / stored / live numbers side by side: ``table`` has columns (metric, source); ``notes`` says where
    each column comes from. Renders as HTML (the notes above the table) in a notebook."""

    table: pd.DataFrame
    notes: list[str]
    missing_label: str | None = None
    precision: int = 2
    formats: Mapping[str, str] = field(default_factory=dict)
    """Format strings by metric, e.g. ``{"p-value": "{:.2e}"}``."""

    def _styled(self):
        sty = self.table.style.format(precision=self.precision, na_rep=NA_REP)
        for metric, fmt in self.formats.items():
            cols = [c for c in self.table.columns if c[0] == metric]
            sty = sty.format(lambda v, fmt=fmt: fmt.format(v) if isinstance(v, (int, float)) else v,
                             subset=cols, na_rep=NA_REP)
        if self.missing_label is not None:
            cols = [c for c in self.table.columns if c[1] == self.missing_label]
            sty = sty.format(na_rep="missing", subset=cols)
        return sty

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return f"<ul>{notes}</ul>" + self._styled().to_html()

    def __repr__(self) -> str:
        return "\n".join(self.notes) + "\n" + self.table.to_string()


def _as_shown(df: pd.DataFrame, columns: Sequence[str], rates: Sequence[str]) -> pd.DataFrame:
    out = df.reindex(columns=list(columns)).copy()
    for c in columns:
        if c in rates:
            out[c] = pd.to_numeric(out[c], errors="coerce") * 100
    return out


def three_columns(live: pd.DataFrame, stored: Stored, paper: pd.DataFrame | Mapping[str, pd.DataFrame] | None,
                  columns: Sequence[str], *, live_profile: Profile | str, rates: Sequence[str] = RATES,
                  precision: int = 2, formats: Mapping[str, str] | None = None) -> Comparison:
    """For each metric in ``columns``: the paper's number (``paper``: a table in the paper's units, or several by
    label, e.g. ``{"paper (CIFAR-10)": ..., "paper (ImageNet)": ...}``), the stored one and the live one, rows in
    ``live``'s order. Rates (``rates``; fractions in ``live`` and ``stored``) are shown in %, as the paper reports
    them. A missing stored table is shown as "missing" and never filled in; a stale one is labelled so."""
    live_name = live_profile.name if isinstance(live_profile, Profile) else str(live_profile)
    live_label = f"{live_name} (live)"
    papers = {} if paper is None else ({"paper (CIFAR-10)": paper} if isinstance(paper, pd.DataFrame) else paper)
    parts = {label: t.reindex(index=live.index, columns=list(columns)) for label, t in papers.items()}
    st = stored.table.reindex(index=live.index) if not stored.missing else pd.DataFrame(index=live.index)
    parts[stored.label] = _as_shown(st, columns, rates)
    parts[live_label] = _as_shown(live, columns, rates)
    table = pd.concat(parts, axis=1).swaplevel(0, 1, axis=1)
    order = list(parts)
    table = table[[(c, src) for c in columns for src in order]]
    notes = [f"{label}: the paper's number." for label in papers]
    notes += [stored.note(), f"{live_label}: computed now on this machine's `{live_name}` profile."]
    if any(c in rates for c in columns):
        notes.append(f"{', '.join(c for c in columns if c in rates)} in %.")
    return Comparison(table, notes, stored.label if stored.missing else None, precision, dict(formats or {}))


# ----------------------------------------------------------------------------------------------- claims
def claims_where(live: pd.DataFrame, profile: str = "full", root: Path | str | None = None
                 ) -> tuple[pd.DataFrame, list[str]]:
    """Every claim on the live profile (``live``: :func:`~ubwlib.experiments.claims.evaluate` of the live tables,
    the report's ``report/claims``) beside the same claim on the stored results of ``profile`` and a column
    "holds where". Returns the table and notes (the stored inputs' provenance, or which are missing: then the
    stored verdicts read "not stored")."""
    from .claims import evaluate

    stored = {k: load_stored(*k.split("/"), profile=profile, root=root) for k in claim_inputs()}
    missing = [k for k, s in stored.items() if s.missing]
    stale = [k for k, s in stored.items() if not s.missing and not s.current]
    out = live[["chapter", "claim", "paper's evidence", "ours", "verdict"]].rename(
        columns={"ours": "live: ours", "verdict": "live: verdict"})
    if missing:
        out[f"{profile}: ours"] = "not stored"
        out[f"{profile}: verdict"] = "not stored"
        notes = [f"{profile} (stored): missing {', '.join(missing)}; `make results PROFILE={profile}` stores them."]
    else:
        full = evaluate({k: s.table for k, s in stored.items()}).reindex(live.index)
        out[f"{profile}: ours"] = full["ours"].values
        out[f"{profile}: verdict"] = full["verdict"].values
        notes = [stored[k].note() for k in stored]
        if stale:
            notes.insert(0, f"STALE stored inputs: {', '.join(stale)}")

    def where(row) -> str:
        here, there = row["live: verdict"] == "holds", row[f"{profile}: verdict"] == "holds"
        if row[f"{profile}: verdict"] == "not stored":
            return "live" if here else "neither (full scale not stored)"
        return {(True, True): "both", (True, False): "live only", (False, True): f"{profile} only",
                (False, False): "neither"}[(here, there)]

    out["holds where"] = out.apply(where, axis=1)
    return out, notes


def claim_inputs() -> tuple[str, ...]:
    """The stored tables the claims read (:func:`ubwlib.experiments.claims.claim_inputs`)."""
    from .claims import claim_inputs as inputs

    return inputs()


# ----------------------------------------------------------------------------------------------- storing chapters
def store_chapter(profile: Profile, chapter: str, directory: Path | str, *, command: str) -> None:
    """Compute every registered table of ``chapter`` by its recipe and store it under ``directory`` (a profile's
    folder): the ``recipes`` route of ``make results``, which needs no Jupyter (e.g. on a GPU machine)."""
    for spec in chapter_tables(chapter):
        t0 = time.perf_counter()
        table = spec.compute(profile)
        store_table(spec, profile, table, directory, seconds=time.perf_counter() - t0, command=command,
                    via="recipes")


def unstored_since(directory: Path | str, chapter: str, started: float) -> list[str]:
    """The registered tables of ``chapter`` not written under ``directory`` since ``started`` (epoch seconds)."""
    out = []
    for spec in chapter_tables(chapter):
        path = _paths(Path(directory), spec)[0]
        if not path.exists() or path.stat().st_mtime < started - 1:
            out.append(spec.id)
    return out


def record_chapter(directory: Path | str, chapter: str, seconds: float, *, via: str, command: str) -> None:
    """After a chapter's tables are stored: its wall time into each table's provenance and into the profile's
    ``manifest.json`` (one entry per chapter, the latest run)."""
    directory = Path(directory)
    for spec in chapter_tables(chapter):
        path, _ = _paths(directory, spec)
        if path.exists():
            doc = json.loads(path.read_text())
            doc["provenance"]["chapter seconds"] = round(seconds, 1)
            write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
    manifest = directory / "manifest.json"
    doc = json.loads(manifest.read_text()) if manifest.exists() else {}
    doc.setdefault("chapters", {})[chapter] = {
        "seconds": round(seconds, 1), "via": via, "tables": [s.name for s in chapter_tables(chapter)],
        **{k: v for k, v in provenance(command).items() if k in ("commit", "dirty", "date", "machine", "torch",
                                                                   "command")}}
    write_text_atomic(manifest, json.dumps(doc, indent=1, sort_keys=True) + "\n")
