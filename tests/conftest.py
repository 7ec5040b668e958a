"""Shared test set-up: CUDA-marked tests skip cleanly without a GPU; a seeded generator."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed, fresh per test."""
    return torch.Generator().manual_seed(1234)
