"""A map_location that names no device of this machine is a ConfigError naming it, not a report
of a truncated or corrupted checkpoint."""
import pytest
import torch

from robustdeq.checkpoint import load_checkpoint, load_model, save_checkpoint
from robustdeq.deq import zoo
from robustdeq.errors import ConfigError


@pytest.fixture
def ckpt(tmp_path):
    m = zoo.build("mlp_deq", hidden=4)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, m, model_config=m.robustdeq_config)
    return path


def test_a_map_location_that_is_no_device(ckpt):
    with pytest.raises(ConfigError, match=r"map_location 'bogus' is not a device"):
        load_model(ckpt, map_location="bogus")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_map_location_without_cuda(ckpt):
    with pytest.raises(ConfigError, match=r"map_location 'cuda': CUDA is not available"):
        load_checkpoint(ckpt, map_location="cuda")


def test_valid_map_locations_still_load(ckpt):
    assert load_checkpoint(ckpt, map_location=torch.device("cpu")).state_dict
    assert load_checkpoint(ckpt, map_location=lambda storage, loc: storage).state_dict
