"""One rule for every radius the package takes (attack eps, evaluation eps, certified radii, training
eps, smoothing radii, the CLI's --eps): a finite real number >= 0 (> 0 for an evaluation's radii),
not a bool; anything else is a ConfigError naming the option."""
import math

import numpy as np
import pytest
import torch

from robustdeq.config import check_radii, check_radius
from robustdeq.errors import ConfigError

BAD = [-0.1, math.nan, math.inf, -math.inf, True, "0.1", None, [0.1]]


@pytest.mark.parametrize("value", BAD)
def test_a_radius_is_a_finite_real_at_least_zero(value):
    with pytest.raises(ConfigError, match="my_eps"):
        check_radius(value, "my_eps")


@pytest.mark.parametrize("value,expected", [(0, 0.0), (0.25, 0.25), (3, 3.0), (np.float32(0.5), 0.5),
                                            (np.int64(2), 2.0)])
def test_good_radii_come_back_as_floats(value, expected):
    out = check_radius(value, "eps")
    assert isinstance(out, float) and out == expected


def test_positive_excludes_zero_and_lists_follow_the_same_rule():
    with pytest.raises(ConfigError, match="> 0"):
        check_radius(0.0, "eps", positive=True)
    assert check_radius(1e-9, "eps", positive=True) == 1e-9
    assert check_radii(None, "eps") == () and check_radii([], "eps") == ()
    assert check_radii(0.1, "eps") == (0.1,) and check_radii((0, 1), "eps") == (0.0, 1.0)
    with pytest.raises(ConfigError, match="required"):
        check_radii(None, "eps", required=True)
    with pytest.raises(ConfigError, match="distinct"):
        check_radii([0.1, 0.1], "eps", distinct=True)
    for bad in BAD[:6]:
        with pytest.raises(ConfigError, match="eps"):
            check_radii([0.1, bad], "eps")


def test_every_entry_point_applies_the_rule():
    from robustdeq.attacks import PGD
    from robustdeq.certify import CertifyConfig
    from robustdeq.certify.smoothing import SmoothingConfig
    from robustdeq.cli.common import floats
    from robustdeq.defenses import PGDAT
    from robustdeq.deq import zoo
    from robustdeq.deq.jiio import LinfBall
    from robustdeq.eval import EvalProtocol
    model = zoo.build("ff_mlp", hidden=4)
    for bad in (-0.1, math.nan, math.inf, True):
        for make in (lambda e: PGD(model, eps=e, steps=1), lambda e: EvalProtocol(eps=e),
                     lambda e: CertifyConfig(eps_l2=e), lambda e: CertifyConfig(eps_linf=[0.1, e]),
                     lambda e: SmoothingConfig(sigma=0.25, radii=(0.0, e)), lambda e: PGDAT(eps=e),
                     lambda e: LinfBall(torch.zeros(1, 2), e)):
            with pytest.raises(ConfigError, match="must be a finite number >= 0|must be a finite number > 0"):
                make(bad)
    with pytest.raises(ConfigError, match="--eps must be a finite number >= 0"):
        floats("0.1,-0.2", "--eps")
    with pytest.raises(ConfigError, match="--eps must be a finite number >= 0"):
        floats("nan", "--eps")
    # zero: a valid radius everywhere but in an evaluation's sweep (its clean accuracy is reported)
    assert PGD(model, eps=0, steps=1).eps == 0.0 and CertifyConfig(eps_l2=0).eps_l2 == (0.0,)
    with pytest.raises(ConfigError, match="> 0"):
        EvalProtocol(eps=0)
