import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded torch: these tensors are tiny and a loaded 2-core box spends far
    longer in thread hand-offs than in arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
