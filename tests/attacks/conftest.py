import pytest
import torch


@pytest.fixture(scope="module")
def batch(digits_test):
    """``batch(dtype=float32, n=8)``: the first ``n`` test digits in ``dtype``."""
    def make(dtype=torch.float32, n=8):
        x, y = digits_test(n)
        return x.to(dtype), y
    return make
