"""Labels outside the model's classes are an InputError naming them in every attack (PGD's joint
iteration on a DEQ, APGD and Square included), never an index error or clean inputs returned as
if every sample were misclassified. An unknown ``joint_options`` key is a ConfigError naming
the known ones (a TypeError from the joint iteration's constructor before)."""
import pytest
import torch

from robustdeq.attacks import PGD, Square
from robustdeq.attacks.apgd import APGD, APGDT
from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.errors import InputError


@pytest.mark.parametrize("make", [
    lambda m: PGD(m, eps=0.1, steps=1),
    lambda m: APGD(m, eps=0.1, steps=1),
    lambda m: APGD(m, eps=0.1, steps=1, loss="dlr"),
    lambda m: APGDT(m, eps=0.1, steps=1, n_target_classes=3),
    lambda m: Square(m, eps=0.1, n_queries=2),
], ids=["pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square"])
def test_label_beyond_the_logits_is_an_input_error(make):
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8).eval()
    x, y = load_digits("test")
    x, y = x[:4], y[:4].clone()
    y[2] = 10
    with pytest.raises(InputError, match="class index 10 but the model outputs 10 logits"):
        make(model)(x, y)


@pytest.mark.parametrize("make", [
    lambda m: PGD(m, eps=0.1, steps=1, joint_options={"fwd_iter": 2}),
    lambda m: APGD(m, eps=0.1, steps=1, joint_options={"fwd_iter": 2}),
], ids=["pgd", "apgd"])
def test_an_unknown_joint_option_is_a_config_error(make):
    from robustdeq.errors import ConfigError
    model = zoo.build("mlp_deq", hidden=8).eval()
    with pytest.raises(ConfigError, match=r"unknown option\(s\) for the joint iteration \(joint_options\): "
                                          r"fwd_iter; known options: adj_iters, first_adj_iters, fwd_iters"):
        make(model)
