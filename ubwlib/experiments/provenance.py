"""Provenance of a stored result: which code, machine and command produced it, and when.

Shared by the stored chapter tables (:mod:`ubwlib.experiments.stored`) and the stored UBW-C study
(:mod:`ubwlib.experiments.study`).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["REPO_ROOT", "COMMIT_ENV", "git", "commit", "machine", "provenance"]

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT_ENV = "UBW_COMMIT"
"""The commit to record where the code runs from a copy of the repository without its ``.git`` (a lent GPU machine
gets the working tree only): ``UBW_COMMIT=<sha>``. A git checkout records its own ``HEAD`` and ignores it."""


def git(*args: str) -> str:
    """``git <args>`` in the repository (stripped output), or ``"unknown"`` outside a git checkout."""
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commit() -> str:
    """The repository's ``HEAD``; outside a git checkout :data:`COMMIT_ENV`'s value, else ``"unknown"``."""
    head = git("rev-parse", "HEAD")
    return head if head != "unknown" else os.environ.get(COMMIT_ENV, "").strip() or "unknown"


def machine() -> str:
    """The device that computes: the GPU's name, else the CPU's model, its threads and the precision ``auto`` trains
    in there (``UBW_PRECISION`` included)."""
    from ..train import cpu_model, resolve_device, resolve_precision

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu_model()}"
    return f"{dev}, {torch.get_num_threads()} threads, {resolve_precision('auto', resolve_device())}"


def provenance(command: str, seconds: float | None = None) -> dict:
    """Commit (and whether tracked files other than the stored results under ``results/`` differed from it: the
    code that ran was not the commit's), UTC date, device, torch and Python versions, the command and its wall
    time in seconds. Outside a git checkout the commit is :data:`COMMIT_ENV`'s (else ``"unknown"``) and whether the
    files differed from it is not known (``None``)."""
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {
        "commit": commit(),
        "dirty": None if status == "unknown" else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "command": command,
        "wall seconds": None if seconds is None else round(float(seconds), 1),
    }
