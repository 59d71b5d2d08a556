"""zoo.build checks the size options the zoo's builders share: a string or negative size, hidden=0,
an in_shape with a zero, num_classes 0 or 1 or a zero std is a ConfigError naming the option,
not a torch error from inside a layer or a model with empty layers."""
import pytest

from robustdeq.deq import zoo
from robustdeq.errors import ConfigError


@pytest.mark.parametrize("name,options,match", [
    ("mlp_deq", {"hidden": "8"}, r"hidden must be a positive int, got '8'"),
    ("mlp_deq", {"hidden": 0}, r"hidden must be a positive int, got 0"),
    ("mlp_deq", {"hidden": -3}, r"hidden must be a positive int, got -3"),
    ("mlp_deq", {"num_classes": 1}, r"num_classes must be an int >= 2, got 1"),
    ("mlp_deq", {"num_classes": 0}, r"num_classes must be an int >= 2, got 0"),
    ("mlp_deq", {"in_shape": 64}, r"in_shape must be a list of positive ints"),
    ("mlp_deq", {"in_shape": [0, 8, 8]}, r"in_shape must be a list of positive ints"),
    ("mlp_deq", {"std": 0.0}, r"std must be a finite number > 0"),
    ("conv_deq", {"channels": 0}, r"channels must be a positive int"),
    ("mdeq", {"channels": [16, 0]}, r"channels must be a positive int \(or a list of them\)"),
    ("conv_deq", {"pool": 0}, r"pool must be a positive int, got 0"),
    ("mdeq", {"stem_stride": 0}, r"stem_stride must be a positive int, got 0"),
    ("weight_tied_mlp", {"depth": 0}, r"depth must be a positive int, got 0"),
    ("weight_tied_mlp", {"seed": -1}, r"seed must be an int >= 0, got -1"),
    ("ff_mlp", {"layers": 1.5}, r"layers must be an int >= 0, got 1.5"),
    ("ff_cnn", {"blocks": -1}, r"blocks must be an int >= 0, got -1"),
    ("lyadeq", {"backtrack": 0}, r"backtrack must be a positive int, got 0"),
])
def test_bad_sizes_are_config_errors_naming_the_model_and_option(name, options, match):
    with pytest.raises(ConfigError, match=rf"model '{name}': " + match):
        zoo.build(name, **options)


def test_valid_sizes_still_build():
    assert zoo.build("mlp_deq", hidden=4, in_shape=[784], num_classes=2, std=[0.3]) is not None
    assert zoo.build("mdeq", channels=[4, 8], groups=2, in_shape=(1, 8, 8)) is not None
    assert zoo.build("ff_mlp", layers=0) is not None and zoo.build("ff_cnn", blocks=0) is not None


def test_ff_cnn_groups_must_divide_its_channels():
    with pytest.raises(ConfigError, match=r"channels \(16\) must be divisible by groups \(3\)"):
        zoo.build("ff_cnn", groups=3)
    assert zoo.build("ff_cnn", groups=3, norm="none") is not None  # no group normalisation
