import pytest
import torch

# Tests run as `pytest -n 2` on 2 cores: one intra-op thread per worker avoids oversubscription, which
# makes tiny ops 10-30x slower. Benchmarks set their own thread counts.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield
