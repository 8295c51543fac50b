"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For modules of tiny models: one intra-op thread is as fast, and it avoids OpenMP's spin-waiting, which
    makes tiny CPU ops many times slower when the cores are shared with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
