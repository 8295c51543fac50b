"""Profiles: named, frozen bundles of every setting that decides how big an experiment is.

- ``smoke``: tests and CI; seconds per chapter (small Fashion-MNIST subsets, a small CNN, 4 epochs).
- ``default``: the book on 2 CPU cores; Fashion-MNIST with a narrow ResNet-18 and a short one-cycle schedule.
- ``lite``: the default profile with a small CNN trained 6 epochs instead of the narrow ResNet-18's 4 (about 5x
  the images/s on a CPU): what ``make book`` builds where the default would not fit 20 minutes (``auto``:
  :mod:`ubwlib.experiments.choice`).
- ``study``: the UBW-C recipe study (``make study``): a fast model trained long enough for the poisons to act.
- ``full``: all of Fashion-MNIST with the paper's ResNet-18 and the paper's schedule shape, for a GPU
  (``make results PROFILE=full`` stores its tables under ``results/full/``).
- ``paper``: CIFAR-10 with ResNet-18 and the paper's 200-epoch schedule, for a GPU.

A profile owns every size that depends on it: the model and data (above), the gradient-matching budget
(:class:`CraftingBudget`), the ablation grid (:class:`AblationGrid`) and the verification counts
(:class:`VerificationSizes`). A new profile is one :class:`Profile`; nothing is looked up by profile name.

``UBW_PROFILE`` selects the profile when none is named (so ``UBW_PROFILE=paper jupyter-book build book/``
rebuilds the book on the paper profile); any field can be overridden with :func:`get_profile`'s keywords.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..train import TrainConfig

__all__ = ["Profile", "PROFILES", "CraftingBudget", "AblationGrid", "VerificationSizes", "get_profile",
           "profile_names"]


@dataclass(frozen=True)
class CraftingBudget:
    """How much gradient matching (Sleeper Agent, UBW-C) a profile affords. Defaults: the public code's."""

    steps: int = 250
    """Crafting steps."""
    retrain_every: int = 50
    """Retrain the surrogate from scratch every this many steps (0: never)."""
    schedule: str = "public"
    """How the surrogate is pre-trained and retrained: ``public`` (the public code's 100 and 40 epochs) or
    ``profile`` (the profile's own training schedule, so that surrogates and victims are trained alike)."""
    precision: str = "fp32"
    """Precision of the double-backward passes (``fp32`` or ``auto``: bf16 where the device supports it)."""
    held_out: int = 0
    """Held-out models for the transfer diagnostic (0: none)."""
    diagnostic_every: int = 5
    """Steps between two evaluations of the transfer diagnostic."""
    checkpoint_every: int = 10
    """Steps between two checkpoints of an interrupted crafting."""

    def __post_init__(self) -> None:
        if self.schedule not in ("public", "profile"):
            raise ValueError(f"schedule must be 'public' or 'profile', got {self.schedule!r}")


@dataclass(frozen=True)
class AblationGrid:
    """The points of the ablations chapter (Figures 4 and 5). Defaults: a grid over the ranges of the paper's
    figures (gamma about 0.02..0.10, lambda 0..3; the exact grid is not published), with gamma = 0.03, the point
    its text names."""

    ubw_p_gammas: tuple[float, ...] = (0.02, 0.03, 0.04, 0.06, 0.08, 0.1)
    ubw_c_gammas: tuple[float, ...] = (0.02, 0.03, 0.04, 0.06, 0.08, 0.1)
    lambdas: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)
    """UBW-C's lambda (Figure 5), at the Table 1 poisoning rate."""

    def gammas(self) -> dict[str, tuple[float, ...]]:
        return {"ubw-p": tuple(self.ubw_p_gammas), "ubw-c": tuple(self.ubw_c_gammas)}


@dataclass(frozen=True)
class VerificationSizes:
    """The counts of the verification chapter. Defaults: the paper's m = 100 and this book's choices."""

    m: int = 100
    """Images per hypothesis test (Proposition 1)."""
    false_positive_triggers: int = 8
    """Independent triggers per method in the false-positive table."""
    false_positive_models: int = 3
    """Independent (benign) models per method in the false-positive table."""
    power_ms: tuple[int, ...] = (3, 5, 10, 20, 50, 100, 200)
    """The m of the power curve."""
    power_repeats: int = 50
    """Random draws per point of the power curve."""
    forgery_models: int = 3
    """Innocent models per method in the forgery table."""
    forgery_steps: int = 100
    """Optimisation steps of each forged key."""


@dataclass(frozen=True)
class Profile:
    """Every setting of a profile. ``train`` holds the trainer's settings (epochs, batch size, schedule...)."""

    name: str
    dataset: str
    """A ``ubwlib.data.load_dataset`` spec: ``fashion-mnist``, ``cifar10``, ``imagefolder:<path>``, ``imagenet50:<path>``."""
    model: str
    """A ``ubwlib.models.build_model`` name."""
    width: float
    """Channel multiplier of the model (1.0 = the paper's ResNet-18)."""
    train: TrainConfig
    train_size: int | None = None
    """Stratified subset of the training split (None = all of it)."""
    test_size: int | None = None
    """Stratified subset of the test split (None = all of it)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds for experiments repeated over seeds; ``seeds[0]`` is the seed of single runs."""
    subset_seed: int = 0
    crafting: CraftingBudget = field(default_factory=CraftingBudget)
    """The gradient-matching budget."""
    grid: AblationGrid = field(default_factory=AblationGrid)
    """The ablation grid."""
    verification: VerificationSizes = field(default_factory=VerificationSizes)
    """The verification counts."""
    description: str = ""
    stack: int = 1
    """How many models a recipe that trains several (victims of several releases, seed repeats) trains side by
    side in one pass (:func:`ubwlib.train.train_many`; 1: one at a time). A speed setting: the cache keys and the
    stored results' hashes ignore it. A model trained in a stack differs from one trained alone in float rounding,
    which a from-scratch training amplifies as a change of the data order would."""
    data_root: str | None = field(default=None, compare=False)
    """Where to look for the dataset first (else ``$UBW_DATA``, then the system folder); not part of any cache key."""

    @property
    def seed(self) -> int:
        return self.seeds[0]

    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict:
        """A flat ``{setting: value}`` view for the settings tables of the book."""
        nested = ("train", "crafting", "grid", "verification")
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in (*nested, "description", "data_root")}
        for group in nested:
            out.update({f"{group}.{k}": v for k, v in dataclasses.asdict(getattr(self, group)).items()})
        return out


#: The gradient-matching budget and the ablation grid of the CPU profiles (default, study).
_CPU_CRAFTING = CraftingBudget(steps=20, retrain_every=10, schedule="profile", precision="auto", held_out=1,
                               diagnostic_every=5, checkpoint_every=5)
_CPU_GRID = AblationGrid(ubw_p_gammas=(0.01, 0.03, 0.05, 0.1), ubw_c_gammas=(0.03, 0.1), lambdas=(0.0, 2.0, 4.0))

#: The book on 2 CPU cores.
_DEFAULT = Profile(
    name="default",
    dataset="fashion-mnist",
    model="resnet18-cifar",
    width=0.125,
    train=TrainConfig(epochs=4, batch_size=128, lr=0.1, schedule="onecycle", weight_decay=5e-4,
                      crop_padding=0, flip=True, seed=0),
    train_size=30000,
    test_size=10000,
    seeds=(0, 1, 2),
    description="The book on 2 CPU cores: Fashion-MNIST, ResNet-18 at 1/8 width, a short one-cycle schedule.",
    stack=4,  # narrow models: 4 side by side train about 1.5x faster per model on 2 cores (ubwlib.bench)
    crafting=_CPU_CRAFTING,
    # lambda up to 4: the lever must be long enough to show an effect above the noise of 4-epoch runs
    grid=_CPU_GRID,
)
#: The default profile's experiments with a model that trains about 5x the images/s on a CPU, and the epochs it
#: needs to learn every targeted baseline's trigger (Blended's: 20% at 4 epochs, 99.0% at 6; the README).
_LITE = _DEFAULT.replace(
    name="lite",
    model="smallcnn",
    width=0.5,
    train=_DEFAULT.train.replace(epochs=6),
    # one at a time: in its cold build 4 small CNNs side by side took 37 s per model, one alone 21.5-24 s
    stack=1,
    description="The default profile with the small CNN at half width instead of ResNet-18 at 1/8 width, 6 epochs "
                "instead of 4 (a cold build about 4x faster on a CPU): what `make book` builds where the default "
                "would not fit its time budget (ubwlib.experiments.choice).",
)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        dataset="fashion-mnist",
        model="smallcnn",
        width=0.5,
        train=TrainConfig(epochs=4, batch_size=128, lr=0.1, schedule="onecycle", weight_decay=5e-4,
                          crop_padding=0, flip=True, seed=0),
        train_size=2000,
        test_size=500,
        seeds=(0, 1, 2),
        description="Tests and CI: seconds per chapter.",
        stack=4,
        crafting=CraftingBudget(steps=4, retrain_every=2, schedule="profile", precision="auto", held_out=1,
                                diagnostic_every=2, checkpoint_every=2),
        grid=AblationGrid(ubw_p_gammas=(0.05, 0.1), ubw_c_gammas=(0.05, 0.1), lambdas=(0.0, 2.0)),
        # m = 20: the smoke test set holds too few correctly classified source-class images for 100
        verification=VerificationSizes(m=20, false_positive_triggers=2, false_positive_models=1, power_ms=(3, 5, 10),
                                       power_repeats=10, forgery_models=2, forgery_steps=5),
    ),
    "default": _DEFAULT,
    "lite": _LITE,
    "study": Profile(
        name="study",
        dataset="fashion-mnist",
        model="smallcnn",
        width=0.5,
        train=TrainConfig(epochs=16, batch_size=128, lr=0.1, schedule="onecycle", weight_decay=5e-4,
                          crop_padding=0, flip=True, seed=0),
        train_size=10000,
        test_size=10000,
        seeds=(0, 1, 2),
        description="The UBW-C recipe study on 2 CPU cores: 10k Fashion-MNIST images, the small CNN at half "
                    "width, 16 epochs (one release plus one victim in about 4 minutes).",
        crafting=dataclasses.replace(_CPU_CRAFTING, steps=40, retrain_every=20),
        grid=_CPU_GRID,
    ),
    "full": Profile(
        name="full",
        dataset="fashion-mnist",
        model="resnet18-cifar",
        width=1.0,
        # the paper's schedule shape (SGD, lr x0.1 at 75% and 90% of the epochs), shortened to fit a GPU's minutes
        train=TrainConfig(epochs=20, milestones=(15, 18), seed=0),
        train_size=None,
        test_size=None,
        seeds=(0, 1, 2),
        # the public code's budget (250 steps, a retraining every 50), surrogates trained like the victims
        crafting=CraftingBudget(schedule="profile", precision="auto", held_out=1, diagnostic_every=25,
                                checkpoint_every=25),
        description="Full scale on a GPU: all of Fashion-MNIST (60k/10k), the paper's ResNet-18, its schedule shape "
                    "over 20 epochs, the public code's crafting budget.",
    ),
    "paper": Profile(
        name="paper",
        dataset="cifar10",
        model="resnet18-cifar",
        width=1.0,
        train=TrainConfig(seed=666),
        train_size=None,
        test_size=None,
        seeds=(666, 667, 668),
        description="The paper's setting: CIFAR-10, ResNet-18, 200 epochs of SGD (lr x0.1 at 150 and 180); a GPU.",
    ),
}


def profile_names() -> tuple[str, ...]:
    return tuple(PROFILES)


def get_profile(name: str | Profile | None = None, **overrides) -> Profile:
    """The profile ``name`` (``None``: ``$UBW_PROFILE``, else ``default``), with ``overrides`` applied. ``auto``:
    the profile :func:`ubwlib.experiments.choice.chosen_profile` picks for this machine.

    ``train``, ``crafting``, ``grid`` and ``verification`` overrides may be given as dicts of their fields, e.g.
    ``get_profile("smoke", train={"epochs": 1}, crafting={"steps": 8})``.
    """
    if isinstance(name, Profile):
        prof = name
    else:
        key = name or os.environ.get("UBW_PROFILE") or "default"
        if key == "auto":  # chosen by this machine's measured speed (recorded; see ubwlib.experiments.choice)
            from .choice import chosen_profile

            prof = chosen_profile()
        else:
            try:
                prof = PROFILES[key]
            except KeyError:
                raise ValueError(f"unknown profile {key!r}; choose one of {', '.join(PROFILES)} "
                                 "(or auto: chosen by this machine's speed)") from None
    for group in ("train", "crafting", "grid", "verification"):
        if group in overrides and isinstance(overrides[group], dict):
            current = getattr(prof, group)
            valid = {f.name for f in dataclasses.fields(current)}
            bad_group = set(overrides[group]) - valid
            if bad_group:
                raise ValueError(f"unknown {group} setting(s) {sorted(bad_group)}; valid: {sorted(valid)}")
            overrides[group] = dataclasses.replace(current, **overrides[group])
    bad = set(overrides) - {f.name for f in dataclasses.fields(Profile)}
    if bad:
        raise ValueError(f"unknown profile setting(s) {sorted(bad)}; valid: {[f.name for f in dataclasses.fields(Profile)]}")
    return dataclasses.replace(prof, **overrides) if overrides else prof
