"""Shared fixtures: real catalogue models (fetched once into the flashserve cache) and torch threads."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from flashserve.model.catalogue import fetch

    return str(fetch("smollm2-135m"))


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    from flashserve.model.catalogue import fetch

    return str(fetch("gemma3-270m"))
