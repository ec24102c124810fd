import os
import random

import pytest
import torch


@pytest.fixture
def generator(request):
    """A torch generator seeded per test (KVLINK_TEST_SEED overrides); the seed is printed on failure."""
    seed = int(os.environ.get("KVLINK_TEST_SEED", random.randrange(2**31)))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
