"""Shared test settings: deterministic seeds and the markers this suite uses."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: slow full-size checks, run by hand or on a GPU (-m heavy)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
