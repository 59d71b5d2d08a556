"""The contract every attack keeps: eps ball, [0, 1], dtype (float32 and float64), device,
detached output, reproducible under a seed, the global RNG untouched."""

import pytest
import torch

import robustdeq.attacks as A

from helpers.attacks import check_ball

EPS = 0.1


# every attack, as a factory (model -> attack); AutoAttack and torchattacks kept small
FACTORIES = {
    "fgsm": lambda m, s: A.FGSM(m, eps=EPS, seed=s),
    "fgsm-l2": lambda m, s: A.FGSM(m, eps=0.5, norm="L2", seed=s),
    "pgd": lambda m, s: A.PGD(m, eps=EPS, steps=3, seed=s),
    "pgd-l2": lambda m, s: A.PGD(m, eps=0.5, norm="L2", steps=3, seed=s),
    "pgd-dlr": lambda m, s: A.PGD(m, eps=EPS, steps=3, loss="dlr", seed=s),
    "pgd-phantom": lambda m, s: A.PGD(m, eps=EPS, steps=3, grad="phantom", seed=s),
    "pgd-unrolled": lambda m, s: A.PGD(m, eps=EPS, steps=3, grad="unrolled", seed=s),
    "pgd-full": lambda m, s: A.PGD(m, eps=EPS, steps=2, grad="full", seed=s),
    "state": lambda m, s: A.StateAttack(m, eps=EPS, steps=3, states=[2, 4], seed=s),
    "state-ensemble": lambda m, s: A.StateAttack(m, eps=EPS, steps=3, states=[2, 4], ensemble=True, seed=s),
    "state-adjoint": lambda m, s: A.StateAttack(m, eps=0.5, norm="L2", steps=3, states=3,
                                                mode="adjoint", seed=s),
    "autoattack": lambda m, s: A.AutoAttack(m, eps=EPS, version="custom", attacks=["apgd-ce"],
                                            seed=s, settings={"apgd.n_iter": 3, "apgd.n_restarts": 1}),
    "autoattack-l2": lambda m, s: A.AutoAttack(m, eps=0.5, norm="L2", version="custom",
                                               attacks=["apgd-ce"], seed=s,
                                               settings={"apgd.n_iter": 3, "apgd.n_restarts": 1}),
    "torchattacks-pgd": lambda m, s: A.TorchAttack(m, "PGD", eps=EPS, alpha=0.03, steps=3, seed=s),
    "torchattacks-square": lambda m, s: A.TorchAttack(m, "Square", eps=0.3, n_queries=20, seed=s),
    "worst-case": lambda m, s: A.WorstCase([A.FGSM(m, eps=EPS, seed=s), A.PGD(m, eps=EPS, steps=2, seed=s)]),
}
DEQ_ONLY = {"pgd-phantom", "pgd-unrolled", "pgd-full", "state", "state-ensemble", "state-adjoint"}


# the trained helper DEQ's 30-iteration solves leave a sample or two above tol: not the subject here
@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_attack_respects_ball_box_dtype_device_and_seed(name, dtype, trained_model, batch):
    model = trained_model("mlp_deq", hidden=32).to(dtype)
    x, y = batch(dtype)
    rng_before = torch.get_rng_state()
    a1 = FACTORIES[name](model, 3)(x, y)
    a2 = FACTORIES[name](model, 3)(x, y)
    assert torch.equal(torch.get_rng_state(), rng_before), "an attack touched the global RNG"
    assert a1.dtype == dtype and a1.device == x.device and a1.shape == x.shape
    assert not a1.requires_grad
    atk = FACTORIES[name](model, 3)
    eps = getattr(atk, "eps", None) or atk.attacks[0].eps
    norm = getattr(atk, "norm", None) or atk.attacks[0].norm
    check_ball(x, a1, eps, norm)
    assert torch.equal(a1, a2), "same seed, different x_adv"
    assert not torch.equal(a1, x), "the attack did nothing"


@pytest.mark.parametrize("name", sorted(set(FACTORIES) - DEQ_ONLY))
def test_every_generic_attack_runs_on_a_feed_forward_model(name, trained_model, batch):
    model = trained_model("ff_mlp", hidden=32)
    x, y = batch()
    atk = FACTORIES[name](model, 0)
    xa = atk(x, y)
    assert xa.dtype == x.dtype and xa.shape == x.shape and not xa.requires_grad
    # the attack's own ball (eps 0.1 Linf, 0.3 for Square, 0.5 L2), not the widest one
    check_ball(x, xa, getattr(atk, "eps", None) or atk.attacks[0].eps,
               getattr(atk, "norm", None) or atk.attacks[0].norm)
    assert not torch.equal(xa, x), "the attack did nothing"


