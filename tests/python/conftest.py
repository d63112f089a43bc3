"""Shared pytest configuration: seeding, and skipping CUDA tests where no GPU exists."""

import pytest
import torch

import custom_bn  # noqa: F401  (loads the operators once, fails fast when _C is not built)

CUDA_SKIP_REASON = "CUDA is not available (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
