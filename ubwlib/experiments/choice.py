"""Which profile the book is built with on this machine (``UBW_PROFILE=auto``, what ``make book`` asks for).

The default profile's cold build is about 75% training of its model and the rest gradient matching and evaluation
of the same model, all bound by its convolutions, so its time on a machine scales with the images/s that machine
trains that model at. :data:`REFERENCES` holds, for each candidate profile, one measured cold build and the
images/s of :func:`probe_rate` on the same machine; on another machine::

    predicted seconds = reference seconds x reference images/s / this machine's images/s

:func:`choose` measures each candidate's rate (a few seconds), predicts its cold build and takes the first
candidate (:data:`CANDIDATES`, the most faithful first) predicted to fit the budget (``$UBW_BUILD_MINUTES``, else
:data:`BUILD_MINUTES`); when none fits, the fastest. The choice is recorded in the cache folder with what it was
measured on, so that the pages of one build, and the next builds on the same machine, do not flip between profiles
on a noisy measurement; a changed machine, thread count, precision, budget or reference measures again
(``ubw profile --measure`` forces it).

A name other than ``auto`` is never second-guessed: ``UBW_PROFILE=default make book`` builds the default profile
however long it takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._paths import cache_root
from ..cache import Cache
from ..cache.files import write_text_atomic
from ..data import ImageDataset
from ..models import build_model
from ..train import cpu_model, resolve_device, resolve_precision, train
from .profiles import PROFILES, Profile

__all__ = ["AUTO", "BUILD_MINUTES", "CANDIDATES", "REFERENCES", "Reference", "Choice", "probe_rate", "predict",
           "choose", "chosen_profile", "record_path"]

#: The profile name that asks for this module's choice.
AUTO = "auto"
#: The budget of a cold build of the whole book, in minutes (issue 11's target on 2 CPU cores).
BUILD_MINUTES = 20.0
#: The profiles ``auto`` chooses from, the most faithful first.
CANDIDATES = ("default", "lite")
_BUDGET_ENV = "UBW_BUILD_MINUTES"


@dataclass(frozen=True)
class Reference:
    """One measured cold build of the whole book on a profile, and :func:`probe_rate` of that profile's model on
    the same machine (the same session, float32 there)."""

    seconds: float
    rate: float
    machine: str
    command: str


_XEON = "Intel(R) Xeon(R) Processor (AVX-512, AVX-512 BF16, no AMX), 2 threads, fp32"
_COLD = "UBW_PROFILE={} jupyter-book build -W --keep-going book/, fresh UBW_CACHE"
#: The measured cold builds on that machine, each with :func:`probe_rate` of its model there that day. default:
#: 2026-12-01, commit 51679ac, 66 minutes; rate the mean of four one-round probes (1,591 / 1,613 / 1,664 / 1,718).
#: lite: 2026-12-01, commit 364dfbf, as ``make book`` with ``auto`` choosing it, 15.8 minutes; rate the probe that
#: chose it (default measured 2,090 in the same call). The default's reference predates ``ubwlib.train``'s allocator
#: settings, which speed its probe more than its build: its ablations chapter took 1,456 s at 364dfbf against 1,379
#: s before, so its prediction is now somewhat optimistic (about 52 against 66 minutes on that machine).
REFERENCES: dict[str, Reference] = {
    "default": Reference(seconds=3945.0, rate=1647.0, machine=_XEON, command=_COLD.format("default")),
    "lite": Reference(seconds=946.0, rate=10672.0, machine=_XEON, command=_COLD.format("lite")),
}


def probe_rate(profile: Profile, *, steps: int = 24, warmup: int = 4, min_seconds: float = 2.0,
               device: str | torch.device | None = None, image_shape: tuple[int, int, int] = (1, 28, 28),
               num_classes: int = 10) -> float:
    """Images/s at which :func:`ubwlib.train.train` trains ``profile``'s model here: ``warmup`` batches of the
    profile's batch size, then rounds of ``steps`` timed ones until ``min_seconds`` have passed, on random images of
    ``image_shape`` (speed does not depend on the pixels), in the precision ``auto`` resolves to. About 3 s per
    profile on 2 cores; a single round of a fast model (0.5 s) varied by 25% between calls."""
    if steps < 1 or warmup < 0 or min_seconds < 0:
        raise ValueError(f"steps must be >= 1, warmup and min_seconds >= 0, got {steps}, {warmup}, {min_seconds}")
    dev = resolve_device(device)
    cfg = profile.train.replace(epochs=1, drop_last=True, schedule="constant", seed=0)
    g = torch.Generator().manual_seed(0)
    n = (steps + warmup) * cfg.batch_size
    images = torch.randint(0, 256, (n, *image_shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    data = ImageDataset(images, labels, tuple(str(k) for k in range(num_classes)), "probe")
    model = build_model(profile.model, num_classes, image_shape[0], profile.width, seed=0)
    if warmup:
        train(model, data.subset(torch.arange(warmup * cfg.batch_size)), cfg, device=dev, progress=False)
    timed = data.subset(torch.arange(warmup * cfg.batch_size, n))
    rounds, t0 = 0, time.perf_counter()
    while True:
        train(model, timed, cfg, device=dev, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rounds += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return rounds * steps * cfg.batch_size / elapsed


def predict(name: str, rate: float) -> float:
    """Predicted seconds of a cold build of profile ``name`` on a machine that trains its model at ``rate``."""
    if name not in REFERENCES:
        raise ValueError(f"no reference cold build for profile {name!r}; known: {sorted(REFERENCES)}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 images/s, got {rate}")
    ref = REFERENCES[name]
    return ref.seconds * ref.rate / rate


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` decided, and on what."""

    profile: str
    budget_minutes: float
    rates: dict[str, float]
    """Images/s of each candidate's model (:func:`probe_rate`)."""
    predicted_minutes: dict[str, float]
    machine: dict[str, str]
    measured: str
    """When the rates were measured (UTC, ISO 8601)."""

    def reason(self) -> str:
        """The choice in one sentence, for the book."""
        first = CANDIDATES[0]
        pred = ", ".join(f"{n} {self.predicted_minutes[n]:.0f}" for n in CANDIDATES if n in self.predicted_minutes)
        where = (f"{self.machine.get('cpu', '?')}, {self.machine.get('threads', '?')} threads, "
                 f"{self.machine.get('device', '?')}, {self.machine.get('precision', '?')}")
        if self.profile == first:
            why = f"its cold build fits the budget of {self.budget_minutes:g} minutes"
        elif self.predicted_minutes.get(self.profile, float("inf")) <= self.budget_minutes:
            why = (f"the {first} profile's cold build would exceed the budget of {self.budget_minutes:g} minutes; "
                   f"`UBW_PROFILE={first} make book` builds it anyway")
        else:
            why = (f"no candidate fits the budget of {self.budget_minutes:g} minutes, so the fastest; "
                   f"`UBW_PROFILE={first} make book` builds the {first} profile anyway")
        return (f"Chosen for this machine ({where}) by `UBW_PROFILE=auto`: {why} (predicted cold builds in minutes: "
                f"{pred}; measured {self.measured[:10]}).")


def record_path() -> Path:
    """Where the choice is recorded: ``<cache>/choice/profile.json``."""
    return cache_root() / "choice" / "profile.json"


def _budget(budget_minutes: float | None) -> float:
    if budget_minutes is None:
        raw = os.environ.get(_BUDGET_ENV, "").strip()
        try:
            budget_minutes = float(raw) if raw else BUILD_MINUTES
        except ValueError:
            raise ValueError(f"${_BUDGET_ENV} must be a number of minutes, got {raw!r}") from None
    if not budget_minutes > 0:
        raise ValueError(f"the build budget must be > 0 minutes, got {budget_minutes}")
    return float(budget_minutes)


def _machine(device: str | torch.device | None) -> dict[str, str]:
    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    return {"cpu": cpu_model(), "device": dev.type, "device name": name, "threads": str(torch.get_num_threads()),
            "precision": resolve_precision("auto", dev), "torch": torch.__version__}


def _key(machine: dict[str, str], budget: float, candidates: tuple[str, ...]) -> str:
    refs = {n: dataclasses.asdict(REFERENCES[n]) for n in candidates if n in REFERENCES}
    blob = json.dumps({"machine": machine, "budget": budget, "candidates": list(candidates), "references": refs,
                       "profiles": {n: repr(PROFILES[n]) for n in candidates}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def choose(budget_minutes: float | None = None, *, candidates: tuple[str, ...] = CANDIDATES, measure: bool = False,
           device: str | torch.device | None = None, rate=probe_rate) -> Choice:
    """The profile to build the book with here (see the module docstring). ``measure``: ignore a recorded choice.
    ``rate(profile, device=...)``: how a candidate's images/s are measured (:func:`probe_rate`)."""
    budget = _budget(budget_minutes)
    if not candidates:
        raise ValueError("candidates must name at least one profile")
    unknown = [n for n in candidates if n not in REFERENCES or n not in PROFILES]
    if unknown:
        raise ValueError(f"no reference cold build for {unknown}; candidates must be among {sorted(REFERENCES)}")
    machine = _machine(device)
    key = _key(machine, budget, tuple(candidates))
    path = record_path()
    saved = None if measure else _recorded(path, key, candidates)
    if saved is not None:
        return saved
    # Measured under the cache's compute lock: no other process building into this cache trains meanwhile (the
    # rates would be those of a shared machine), and a choice recorded while this one waited is taken as it is.
    with Cache(cache_root()).computing():
        saved = None if measure else _recorded(path, key, candidates)
        if saved is not None:
            return saved
        rates: dict[str, float] = {}
        predicted: dict[str, float] = {}
        chosen = None
        for name in candidates:
            rates[name] = float(rate(PROFILES[name], device=device))
            predicted[name] = predict(name, rates[name]) / 60
            if predicted[name] <= budget:
                chosen = name
                break
        if chosen is None:
            chosen = min(predicted, key=predicted.get)
        out = Choice(profile=chosen, budget_minutes=budget, rates=rates, predicted_minutes=predicted,
                     machine=machine, measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"key": key, **dataclasses.asdict(out)}, indent=1))
    return out


def _recorded(path: Path, key: str, candidates: tuple[str, ...]) -> Choice | None:
    """The choice recorded at ``path`` when it was made for ``key`` among ``candidates``, else None."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or saved.get("profile") not in candidates:
        return None
    try:
        return Choice(**{f.name: saved[f.name] for f in dataclasses.fields(Choice)})
    except KeyError:  # written by another version: measure again
        return None


def chosen_profile(budget_minutes: float | None = None, **kwargs) -> Profile:
    """The profile :func:`choose` picks, its description ending with :meth:`Choice.reason`."""
    c = choose(budget_minutes, **kwargs)
    prof = PROFILES[c.profile]
    return prof.replace(description=f"{prof.description} {c.reason()}".strip())
