"""Small API promises: the backbone's names importable from robustdeq.deq, exact normalisation
statistics in float64, solver statistics with the converged fraction, AutoAttack's per-attack
robust accuracies."""
from __future__ import annotations

import warnings

import pytest
import torch

import robustdeq as rd
from robustdeq.errors import GradientMaskingWarning, NonConvergenceWarning


def test_backbone_names_import_from_robustdeq_deq():
    from robustdeq.deq import (DEQClassifier, ImplicitGrad, MLPCell, TransferView, WeightTied,  # noqa: F401
                               attack_view, get_solver, zoo)
    import robustdeq.deq as deq
    assert deq.MLPCell is __import__("robustdeq.deq.cells", fromlist=["MLPCell"]).MLPCell
    assert "MLPCell" in dir(deq) and "solvers" in dir(deq)
    with pytest.raises(ImportError):
        from robustdeq.deq import NoSuchThing  # noqa: F401


def test_normalize_keeps_exact_statistics_in_float64():
    m = rd.zoo.build("mlp_deq", hidden=8, mean=0.3, std=0.4)
    norm = m.injection.normalize
    m64 = m.double()
    assert norm.mean.dtype == torch.float64
    assert float(norm.mean.flatten()[0]) == 0.3 and float(norm.std.flatten()[0]) == 0.4
    m64.float()  # round trip: still exact
    assert float(norm.mean.flatten()[0]) == 0.3
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    m64.double()
    expected = ((x.flatten(1) - 0.3) / 0.4)
    got = norm(x).flatten(1)
    assert torch.equal(got, expected)


def test_solver_stats_converged_fraction():
    m = rd.zoo.build("mlp_deq", hidden=8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        st = m.run(torch.rand(5, 1, 8, 8)).stats
    assert st.converged_fraction == pytest.approx(float(st.converged.float().mean()))
    assert st.mean_steps == pytest.approx(float(st.steps.float().mean()))
    assert st.summary()["converged_fraction"] == pytest.approx(st.converged_fraction)


def test_autoattack_reports_its_per_attack_robust_accuracies(digits_test, trained_mlp):
    from robustdeq.attacks import AutoAttack
    from robustdeq.eval import evaluate
    m = trained_mlp.eval()
    x, y = digits_test(24)
    atk = AutoAttack(m, eps=0.05, version="custom", attacks=["apgd-ce", "apgd-dlr"],
                     settings={"apgd.n_iter": 5})
    x_adv = atk(x, y)
    acc = atk.last_stats["robust_accuracy_after"]
    with torch.no_grad():
        clean = float((m(x).argmax(1) == y).float().mean())
        robust = float((m(x_adv).argmax(1) == y).float().mean())
    assert 0 < robust < clean  # both attacks run (a sample is left after APGD-CE)
    assert set(acc) == {"clean", "apgd-ce", "apgd-dlr"}
    assert acc["clean"] == pytest.approx(clean, abs=1e-4)
    assert acc["apgd-dlr"] == pytest.approx(robust, abs=1e-4)  # cumulative: the last one is final
    assert acc["apgd-dlr"] <= acc["apgd-ce"] <= acc["clean"]
    # the harness keeps them in the unit's description (at this radius APGD-CE breaks every sample:
    # the standard version then stops, instead of running FAB and Square on the survivors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        rep = evaluate(m, x, y, eps=0.2, suite=["autoattack"], checks=False)
    per = rep.result().attack("autoattack").describe["robust_accuracy_after"]
    assert per and per[0]["n"] == int((m(x).argmax(1) == y).sum()) and "apgd-ce" in per[0]


def test_attack_warnings_point_at_the_users_call():
    from robustdeq.attacks import PGD
    m = rd.zoo.build("mlp_deq", hidden=8, solver={"max_iter": 2, "tol": 0.0}).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        PGD(m, eps=0.1, steps=2, grad="ift")(x, y)
    mine = [w for w in rec if issubclass(w.category, NonConvergenceWarning)]
    assert mine and all(w.filename == __file__ for w in mine), {w.filename for w in mine}


def test_register_dataset_and_wrapper(tmp_path):
    from robustdeq.data import dataset_info, load_dataset, register_dataset
    from robustdeq.defenses import register_wrapper
    from robustdeq.errors import ConfigError, InputError
    from robustdeq.registry import DATASETS, WRAPPERS

    def tiny(split, root=None, n=6):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 3

    def broken(split, root=None):
        return torch.rand(4, 1, 8, 8) * 2, torch.zeros(4, dtype=torch.int64)

    try:
        register_dataset("tiny-test", tiny, shape=(1, 8, 8), num_classes=3)
        x, y = load_dataset("tiny-test", "test", n=4)
        assert x.shape == (4, 1, 8, 8) and y.tolist() == [0, 1, 2, 0]
        assert dataset_info("tiny-test") == {"shape": (1, 8, 8), "num_classes": 3}
        with pytest.raises(ConfigError, match="tiny-test"):
            register_dataset("tiny-test", tiny, shape=(1, 8, 8), num_classes=3)
        with pytest.raises(ConfigError, match="built in"):
            register_dataset("digits", tiny, shape=(1, 8, 8), num_classes=3, replace=True)
        register_dataset("broken-test", broken, shape=(1, 8, 8), num_classes=3)
        with pytest.raises(InputError, match="outside"):
            load_dataset("broken-test", "train")
        with pytest.raises(ConfigError, match="tiny-test"):  # the message lists it as known
            load_dataset("nosuch", "train")
    finally:
        for n in ("tiny-test", "broken-test"):
            if n in DATASETS:
                DATASETS.unregister(n)

    from robustdeq.defenses import wrap

    class Clip(torch.nn.Module):
        def __init__(self, model, lo: float = 0.1):
            super().__init__()
            self.model, self.lo = model, lo

        def forward(self, x):
            return self.model(x.clamp(self.lo, 1.0))

    try:
        register_wrapper("clip-test", Clip)
        m = rd.zoo.build("ff_mlp", hidden=8)
        w = wrap(m, "clip-test", {"lo": 0.2})
        assert isinstance(w, Clip) and w.lo == 0.2
        with pytest.raises(ConfigError, match="nosuch"):
            wrap(m, "clip-test", {"nosuch": 1})
        assert wrap(m, "none") is m and wrap(m) is m
        with pytest.raises(ConfigError, match="'none'"):
            wrap(m, "none", {"lo": 0.2})
        with pytest.raises(ConfigError, match="nosuch-defense"):
            wrap(m, "nosuch-defense")
        with pytest.raises(ConfigError):
            register_wrapper("clip-test", Clip)
    finally:
        if "clip-test" in WRAPPERS:
            WRAPPERS.unregister("clip-test")
