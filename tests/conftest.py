"""Pytest fixtures for the whole suite; the shared test helpers are in ``helpers.py``."""

from __future__ import annotations

import pytest
import torch

SMALL_MATRIX_TESTS = ("test_lowrank_", "test_method_", "test_methods_", "test_validation", "test_registry")


@pytest.fixture(autouse=True)
def _one_thread_for_small_matrices(request):
    """The lowrank/methods tests multiply tiny matrices: one intra-op thread avoids the
    oversubscription overhead that dominates on shared CPUs (10x in wall time). Other test
    files (real models) keep torch's default."""
    if not request.node.path.name.startswith(SMALL_MATRIX_TESTS):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
