import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import valle  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def codec():
    return valle.Codec.untrained(seed=0)


@pytest.fixture
def models():
    """A random tiny AR + NAR pair in eval mode (no dropout)."""
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0)
    return valle.ARModel(cfg).eval(), valle.NARModel(cfg).eval()
