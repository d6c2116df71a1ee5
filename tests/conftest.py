from __future__ import annotations

import pytest
import torch

from tiny_models import FAMILIES, build_tiny

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, object]:
    """One tiny checkpoint folder per supported family, built once per test session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


@pytest.fixture
def torch_threads():
    """Set torch's thread count in a test (the returned function); restored after it."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)
