import pytest
import torch


@pytest.fixture(autouse=True)
def seed_and_one_thread():
    """Seed every test; run single-threaded (tiny matmuls on a shared 2-core box are faster that way)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
