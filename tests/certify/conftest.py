"""Fixtures of the certification tests."""
import pytest
import torch

from robustdeq.checkpoint import save_checkpoint
from robustdeq.deq import zoo


@pytest.fixture(scope="module")
def contractive_checkpoint(tmp_path_factory):
    """(path, model): a saved tiny contractive ``mlp_deq`` (spectral norm 0.5), seeded."""
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.5)
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    save_checkpoint(path, model, model_config=model.robustdeq_config)
    return path, model
