"""evaluate refuses labels outside the model's classes with an InputError naming them."""
import pytest
import torch

from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.errors import InputError
from robustdeq.eval import evaluate


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = load_digits("test")
    return zoo.build("mlp_deq", hidden=8).eval(), x[:4], y[:4]


@pytest.mark.parametrize("label,match", [(10, r"class index 10 but the model outputs 10 logits"),
                                         (-1, r"negative class indices \(min -1\)")])
def test_labels_outside_the_classes_are_input_errors(setup, label, match):
    model, x, y = setup
    bad = y.clone()
    bad[1] = label
    with pytest.raises(InputError, match=match):
        evaluate(model, x, bad, eps=0.1, suite=["pgd"], steps=1, checks=False)
