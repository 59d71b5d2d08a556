"""judge refuses labels outside the model's classes (not counted as wrong answers) and an empty
batch, each with an InputError."""
import pytest
import torch

from robustdeq.deq import zoo
from robustdeq.errors import InputError
from robustdeq.eval.card import judge, judge_file


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.build("mlp_deq", hidden=8)


@pytest.mark.parametrize("label,match", [(20, "class index 20 but the model outputs 10 logits"),
                                         (-2, r"negative class indices \(min -2\)")])
def test_labels_outside_the_classes_are_refused(model, label, match):
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([1, label, 2])
    with pytest.raises(InputError, match=match):
        judge(model, x.clone(), y, x=x, eps=0.1)


def test_an_empty_file_is_refused(model, tmp_path):
    path = tmp_path / "adv.pt"
    torch.save({"x_adv": torch.zeros(0, 1, 8, 8), "x": torch.zeros(0, 1, 8, 8),
                "y": torch.zeros(0, dtype=torch.long), "eps": 0.1, "norm": "Linf"}, path)
    with pytest.raises(InputError, match="at least one adversarial example"):
        judge_file(model, path)


def test_an_unreadable_file_is_named_for_what_it_is(model, tmp_path):
    from robustdeq.errors import CheckpointError
    with pytest.raises(CheckpointError, match="cannot read adversarial-examples file .*missing.pt"):
        judge_file(model, tmp_path / "missing.pt")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(CheckpointError, match="JSON text file, not an adversarial-examples file"):
        judge_file(model, tmp_path / "a.json")
