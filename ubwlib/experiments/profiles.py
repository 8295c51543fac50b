"""Profiles: named, frozen bundles of every setting that decides how big an experiment is.

- ``smoke``: tests and CI; seconds per chapter (small Fashion-MNIST subsets, a small CNN, 4 epochs).
- ``default``: the book on 2 CPU cores; Fashion-MNIST with a narrow ResNet-18 and a short one-cycle schedule.
- ``study``: the UBW-C recipe study (``make study``): a fast model trained long enough for the poisons to act.
- ``paper``: CIFAR-10 with ResNet-18 and the paper's 200-epoch schedule, for a GPU.

``UBW_PROFILE`` selects the profile when none is named (so ``UBW_PROFILE=paper jupyter-book build book/``
rebuilds the book on the paper profile); any field can be overridden with :func:`get_profile`'s keywords.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..train import TrainConfig

__all__ = ["Profile", "PROFILES", "get_profile", "profile_names"]


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
    description: str = ""
    data_root: str | None = field(default=None, compare=False)
    """Where to look for the dataset first (else ``$UBW_DATA``, then the system folder); not part of any cache key."""

    @property
    def seed(self) -> int:
        return self.seeds[0]

    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict:
        """A flat ``{setting: value}`` view for the settings tables of the book."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("train", "description", "data_root")}
        out.update({f"train.{k}": v for k, v in dataclasses.asdict(self.train).items()})
        return out


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
    ),
    "default": Profile(
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
    ),
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
    """The profile ``name`` (``None``: ``$UBW_PROFILE``, else ``default``), with ``overrides`` applied.

    ``train`` overrides may be given as a dict, e.g. ``get_profile("smoke", train={"epochs": 1})``.
    """
    if isinstance(name, Profile):
        prof = name
    else:
        key = name or os.environ.get("UBW_PROFILE") or "default"
        try:
            prof = PROFILES[key]
        except KeyError:
            raise ValueError(f"unknown profile {key!r}; choose one of {', '.join(PROFILES)}") from None
    if "train" in overrides and isinstance(overrides["train"], dict):
        valid = {f.name for f in dataclasses.fields(TrainConfig)}
        bad_train = set(overrides["train"]) - valid
        if bad_train:
            raise ValueError(f"unknown train setting(s) {sorted(bad_train)}; valid: {sorted(valid)}")
        overrides["train"] = prof.train.replace(**overrides["train"])
    bad = set(overrides) - {f.name for f in dataclasses.fields(Profile)}
    if bad:
        raise ValueError(f"unknown profile setting(s) {sorted(bad)}; valid: {[f.name for f in dataclasses.fields(Profile)]}")
    return dataclasses.replace(prof, **overrides) if overrides else prof
