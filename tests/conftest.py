"""Shared test set-up: CUDA-marked tests skip cleanly without a GPU; a seeded generator; one
torch thread for modules of tiny problems."""

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


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after. Tiny problems run faster on one thread
    and are immune to oversubscription when the suite shares the cores (two threads were
    measured 9x slower under load). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
