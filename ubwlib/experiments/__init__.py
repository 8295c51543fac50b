"""Experiments: profiles and the cached recipes behind each table and figure of the book.

The book calls only this layer; it calls the methods (``watermarks``, ``verify``, ``defenses``), which
call ``train``, which calls ``models`` and ``data``.
"""

from .core import (VERSIONS, TrainedModel, benign_model, benign_models, computed_with, default_cache, fingerprint,
                   load_data, trained_model, trained_models)
from .profiles import PROFILES, Profile, get_profile, profile_names
from .runs import Run, release, run, run_many

__all__ = [
    "PROFILES",
    "Profile",
    "get_profile",
    "profile_names",
    "VERSIONS",
    "TrainedModel",
    "benign_model",
    "benign_models",
    "default_cache",
    "computed_with",
    "fingerprint",
    "load_data",
    "trained_model",
    "trained_models",
    "release",
    "run",
    "run_many",
    "Run",
]
