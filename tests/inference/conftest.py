"""Fixtures shared by the inference tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops on a 2-core machine: one intra-op thread is several times faster than two
    fighting each other (and than oversubscribing when other processes run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
