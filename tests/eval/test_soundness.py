"""Evaluation soundness: evaluations never change the model they look at, inference-time defenses
are also attacked by transfer, the quick suite is not optimistic, certificates cover the deployed
computation, and Anderson is safeguarded on non-normal contractions."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import robustdeq as rd
from robustdeq import attacks as A
from robustdeq.certify import certify
from robustdeq.certify.oracles import linear_deq
from robustdeq.data import load_digits
from robustdeq.defenses.entropy import EntropyDefense
from robustdeq.deq import zoo
from robustdeq.deq.grad import UnrolledGrad
from robustdeq.deq.solvers import get_solver
from robustdeq.deq.views import TransferView
from robustdeq.errors import CertificationWarning, ConfigError, GradientMaskingWarning, NonConvergenceWarning
from robustdeq.eval import AttackSpec, CheckConfig, evaluate
from robustdeq.guard import model_snapshot, preserve_model, snapshot_diff



@pytest.fixture(scope="module")
def spectral_deq(fit_minibatches):
    """A DEQ with spectral normalisation: its power-iteration buffers change on any train-mode
    forward, so a flag flipped by an evaluation shows up in the buffers too."""
    torch.manual_seed(0)
    x, y = load_digits("train")
    m = fit_minibatches(zoo.build("mlp_deq", hidden=16, norm="spectral", scale=0.9), x, y, 20,
                        lr=1e-2, grad="phantom")
    return m.eval()


@pytest.fixture(scope="module")
def batch(digits_test):
    x, y = digits_test(12)
    return x, y


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        warnings.simplefilter("ignore", GradientMaskingWarning)
        yield


# -- 1. the model under attack is bit-identical afterwards ------------------------------------------
TORCHATTACKS = ["FGSM", "PGD", "PGDL2", "BIM", "RFGSM", "MIFGSM", "TPGD", "EOTPGD", "APGD", "FFGSM",
                "Jitter", "CW", "DeepFool"]


@pytest.mark.parametrize("name", TORCHATTACKS)
def test_torchattacks_through_attack_view_leave_the_model_untouched(spectral_deq, batch, name):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    m = spectral_deq
    snap = model_snapshot(m)
    view = rd.attack_view(m)
    assert view.training is False  # mirrors the model: torchattacks then never calls .train()
    cls = getattr(torchattacks, name)
    kw = {"eps": 0.1} if name not in ("PGDL2",) else {"eps": 0.5}
    if name in ("PGD", "PGDL2", "BIM", "APGD", "TPGD", "EOTPGD", "MIFGSM", "VMIFGSM", "NIFGSM", "Jitter"):
        kw["steps"] = 2
    if name in ("CW", "DeepFool"):
        kw = {"steps": 2}
    with _quiet():
        cls(view, **kw)(x, y)
    assert not m.training
    assert snapshot_diff(snap) == []


def test_views_never_switch_the_viewed_model(spectral_deq, batch):
    m = spectral_deq
    snap = model_snapshot(m)
    d = EntropyDefense(m, rounds=2, solver_steps=1, inner_steps=1)
    assert d.training is False  # born in the wrapped model's mode
    views = [rd.attack_view(m), rd.attack_view(m, state=2), TransferView(m),
             *d.adaptive_views().values()]
    for v in views:
        assert v.training is False
        v.train()  # what torchattacks does to restore a flag it saw as True
        assert v.training is False and not m.training
    assert snapshot_diff(snap) == []


def _own_attacks(m):
    return [
        A.FGSM(m, eps=0.1, grad="ift"),
        A.PGD(m, eps=0.1, steps=3, grad="ift", early_stop=True, restarts=2),
        A.PGD(m, eps=0.1, steps=3, grad=UnrolledGrad(4), loss="margin"),
        A.PGD(m, eps=0.5, steps=3, norm="L2", grad="phantom"),
        A.StateAttack(m, eps=0.1, steps=2, states=2),
        A.AutoAttack(m, eps=0.1, version="custom", attacks=["apgd-ce"], settings={"apgd.n_iter": 2}),
        A.AutoAttack(m, eps=0.1, version="custom", attacks=["apgd-ce"], settings={"apgd.n_iter": 2},
                     view={"state": 2}),
        A.TorchAttack(m, "PGD", eps=0.1, steps=2, training_mode={"model_training": True}),
        A.TorchAttack(m, "FGSM", eps=0.1, view={"grad": "unrolled"}),
        A.build("jiio", m, eps=0.1, iters=3),
    ]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_attack_leaves_flags_buffers_and_parameters_bit_identical(spectral_deq, batch, mode):
    x, y = batch
    m = spectral_deq
    with preserve_model(m):  # the fixture stays in eval mode for the other tests
        m.train(mode == "train")
        for atk in _own_attacks(m):
            snap = model_snapshot(m)
            with _quiet():
                atk(x, y)
            assert snapshot_diff(snap) == [], atk.name


def test_every_suite_leaves_the_model_and_a_defense_untouched(spectral_deq, batch):
    x, y = batch
    x, y = x[:6], y[:6]
    m = spectral_deq
    d = EntropyDefense(m, rounds=2, solver_steps=1, inner_steps=1)
    suite = ["pgd-ift", "pgd-unrolled-margin", "states", "state-ensemble", "transfer-unrolled"]
    # the defense: quick's kinds of unit on each of its adaptive views (APGD-T on 3 targets rather
    # than quick's 9 targets and 3x3 runs: the same attack run over fewer target classes)
    defense_suite = ["pgd-ift", "pgd-unrolled", "apgd-ce", "apgd-t3"]
    # every check runs, with few iterations (what they compute is not the subject here)
    cheap = CheckConfig(large_eps_steps=2, steps_short=1, steps_long=2, black_box_queries=5)
    with preserve_model(m):
        for mode in (False, True):
            m.train(mode)
            d.train(mode)
            for target in (m, d):
                snap = model_snapshot(target)
                with _quiet():
                    evaluate(target, x, y, eps=0.1, suite=suite if target is m else defense_suite, steps=2,
                             checks=True, check_config=cheap)
                    certify(m, x[:4], y[:4], methods=["contraction", "lipschitz"])
                assert snapshot_diff(snap) == []
                assert target.training is mode


def test_preserve_model_restores_values_a_library_changed(spectral_deq):
    m = spectral_deq
    snap = model_snapshot(m)
    with preserve_model(m):
        m.train()
        m(torch.rand(3, 1, 8, 8))  # a train-mode forward updates the spectral-norm buffers
        assert snapshot_diff(snap) != []
        next(m.parameters()).data.add_(1.0)
    assert snapshot_diff(snap) == []
    with pytest.raises(ConfigError):
        with preserve_model(m, "sideways"):
            pass


# -- 2. transfer from the base model breaks a gradient-masking wrapper -------------------------------
class QuantisedDefense(nn.Module):
    """Masks gradients on purpose: the base model on inputs rounded to 1/8 (zero gradient almost
    everywhere). Declares no adaptive view of its own."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.input_shape = model.input_shape
        self.train(model.training)

    def forward(self, x):
        return self.model(torch.round(x * 8) / 8)


def test_transfer_view_breaks_a_wrapper_whose_gradients_are_useless(digits_test, trained_deq):
    base = trained_deq.eval()
    x, y = digits_test(48)
    wrapper = QuantisedDefense(base)
    with _quiet():
        rep = evaluate(wrapper, x, y, eps=0.15, suite=["pgd"], steps=10, checks=False)
        clean_ok = wrapper(x).argmax(1) == y
    r = rep.result()
    assert [a.key for a in r.attacks] == ["pgd", "pgd@transfer-base"]
    own, transfer = r.attack("pgd"), r.attack("pgd@transfer-base")
    assert transfer.kind == "transfer" and transfer.describe["target"] == "transfer-base"
    # the wrapper's own gradient is zero: PGD on it breaks nothing beyond its random start
    assert own.accuracy >= rep.clean_accuracy - 0.05
    # the transfer attack breaks it: oracle, PGD crafted on the base by hand, judged on the wrapper
    atk = A.PGD(base, eps=0.15, steps=10)
    with _quiet():
        x_adv = atk(x, y)
    with _quiet():
        hand = float(((wrapper(x_adv).argmax(1) == y) & clean_ok).float().mean())
    assert hand < own.accuracy - 0.2
    assert r.robust_accuracy <= transfer.accuracy + 1e-9
    assert transfer.accuracy < own.accuracy - 0.2


def test_transfer_from_user_named_models(batch, trained_deq):
    base = trained_deq.eval()
    x, y = batch
    surrogate = zoo.build("ff_mlp", hidden=16).eval()
    with _quiet():
        rep = evaluate(base, x, y, eps=0.1, suite=["pgd-ift"], steps=2, checks=False,
                       transfer_from={"mlp": surrogate})
    # PGD-IFT needs a DEQ in its target: the feed-forward surrogate is skipped, with a note
    assert [a.key for a in rep.result().attacks] == ["pgd-ift"]
    assert any("pgd-ift skipped on transfer-mlp" in n for n in rep.notes)
    rep2 = evaluate(base, x, y, eps=0.1, suite=["pgd"], steps=2, checks=False, transfer_from={"mlp": surrogate})
    assert [a.key for a in rep2.result().attacks] == ["pgd", "pgd@transfer-mlp"]
    # the source model is part of the configuration (a resumed run cannot mix sources)
    other = zoo.build("ff_mlp", hidden=8).eval()
    rep3 = evaluate(base, x, y, eps=0.1, suite=["pgd"], steps=2, checks=False, transfer_from={"mlp": other})
    assert rep3.config_hash != rep2.config_hash
    with pytest.raises(ConfigError):
        evaluate(base, x, y, eps=0.1, suite=["pgd"], transfer_from={"a/b": surrogate})
    with pytest.raises(ConfigError):
        evaluate(base, x, y, eps=0.1, suite=["pgd"], transfer_from={"self": base})


# -- 3. the quick suite is within 1 point of a strong PGD ensemble -----------------------------------
def _pgd_ensemble(judge, steps=100, restarts=5):
    specs = []
    for gname, grad in (("ift", "ift"), ("unrolled", UnrolledGrad(8))):
        for loss in ("ce", "margin"):
            def factory(target, *, eps, norm, steps_=steps, seed, grad=grad, loss=loss, **_):
                # exact solves at every step: the reference for the quick suite's joint iteration
                return A.PGD(target, eps=eps, alpha=2.5 * eps / steps_, steps=steps_, norm=norm,
                             grad=grad, loss=loss, restarts=restarts, seed=seed,
                             early_stop=target is judge, method="exact")
            specs.append(AttackSpec(f"ens-{gname}-{loss}", factory))
    return specs


def test_quick_suite_is_within_one_point_of_a_pgd100_ensemble(digits_test, trained_deq):
    m = trained_deq.eval()
    x, y = digits_test(64)
    with _quiet():
        quick = evaluate(m, x, y, eps=0.1, suite="quick", checks=False)
        # the ensemble attacks the samples quick left robust (a sample quick broke cannot make
        # quick optimistic), in cascade: the same worst case over its attacks, each attack run
        # only on the samples the earlier ones left robust
        left = torch.tensor(quick.to_dict()["results"][0]["robust"])
        assert left.any()  # else the comparison below would check nothing
        ens = evaluate(m, x[left], y[left], eps=0.1, suite=_pgd_ensemble(m), checks=False, cascade=True)
    # per sample, which implies quick.robust_accuracy() <= (the ensemble's on all 64) + 0.01
    missed = int(left.sum()) - sum(ens.to_dict()["results"][0]["robust"])
    assert missed <= 0.01 * len(y), f"the PGD-100 ensemble broke {missed} samples quick left robust"
    assert "upper bound" in quick.bound_statement and "'quick'" in quick.bound_statement
    # the statement describes what quick ran: no score-based unit, and it says so
    keys = {a.key for a in quick.results[0].attacks}
    assert not any("square" in k for k in keys)
    assert "no score-based attack" in quick.bound_statement and "short Square" not in quick.bound_statement
    assert "upper bound" in quick.to_markdown() and quick.to_dict()["bound"] == quick.bound_statement


def test_pgd_restarts_never_weaker_and_validated(batch, trained_deq):
    m = trained_deq.eval()
    x, y = batch
    with _quiet():
        one = A.PGD(m, eps=0.1, steps=5, seed=3)(x, y)
        three = A.PGD(m, eps=0.1, steps=5, seed=3, restarts=3)(x, y)
    broken1 = m(one).argmax(1) != y
    broken3 = m(three).argmax(1) != y
    assert bool((broken3 | ~broken1).all())  # a sample broken by the first run stays broken
    with pytest.raises(ConfigError):
        A.PGD(m, eps=0.1, restarts=2, random_start=False)
    with pytest.raises(ConfigError):
        A.PGD(m, eps=0.1, restarts=0)


# -- 4. certificates cover the deployed computation ---------------------------------------------------
def _nonnormal(d=16, c=0.6):
    return 0.5 * torch.eye(d) + c * torch.diag(torch.ones(d - 1), 1)


def test_certify_refuses_samples_the_deployed_solve_does_not_reach(fit_minibatches):
    """The issue's repro: a linear DEQ with A = 0.5 I + 0.6 N whose own solver (unguarded Anderson,
    60 iterations, abs tol 1e-5) does not converge; certify must not certify what the model does
    not compute."""
    torch.manual_seed(0)
    model = linear_deq(_nonnormal(), solver={"name": "anderson", "max_iter": 60, "tol": 1e-5,
                                             "stop_mode": "abs", "safeguard": 0.0})
    x, y = load_digits("train")
    model = fit_minibatches(model, x, y, 40, lr=1e-2, grad="phantom").eval()
    xt, yt = load_digits("test")
    xt, yt = xt[:100], yt[:100]
    with torch.no_grad(), _quiet():
        eq = model.run(xt)
    assert float(eq.stats.converged.float().mean()) < 0.5  # the deployed solve really fails
    with pytest.warns(CertificationWarning, match="does not reach the certified fixed point"):
        rep = certify(model, xt, yt, methods=["contraction", "lipschitz"], eps_l2=(0.05,))
    deployed_pred = model(xt).argmax(1)
    for r in rep.results:
        d = r.details
        i = d["index"]
        assert "deployed" in d
        if r.radius > 0:
            # every certified sample: the model's own computation is the certified one
            assert d["deployed"]["reaches_certified_fixed_point"]
            assert int(deployed_pred[i]) == d["pred"] == int(yt[i])
        if not d["deployed"]["reaches_certified_fixed_point"]:
            assert r.radius == 0 and not any(d.get("l2_certified", {}).values())
            assert "refused" in r.method
    refused = sum(not r.details["deployed"]["reaches_certified_fixed_point"] for r in rep.results)
    assert refused > 0
    assert rep.global_certificates["computation"]["deployed"]["refused"] == refused
    # a tolerance of 0 refuses every sample whose deployed state is not exactly z*
    with pytest.raises(ConfigError):
        certify(model, xt[:2], deploy_tol=-1.0)


# -- 5. safeguarded Anderson on non-normal contractions ------------------------------------------------
@pytest.mark.parametrize("c", [0.6, 0.7, 0.8, 0.9])
def test_safeguarded_anderson_converges_where_plain_iteration_does(c):
    """Non-normal contractions A = 0.5 I + c N (spectral radius 0.5, ||A|| > 1): plain iteration
    converges within 100 iterations, unguarded Anderson does not; guarded Anderson converges on
    every sample, to the true fixed point, in no more iterations than plain iteration."""
    torch.manual_seed(0)
    d = 16
    A_ = _nonnormal(d, c).double()
    u = torch.randn(64, d, dtype=torch.float64)
    f = lambda z: z @ A_.T + u
    z0 = torch.zeros(64, d, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - A_, u.T).T
    kw = dict(max_iter=100, tol=1e-5, stop_mode="abs")
    plain = get_solver("fixed_point", **kw).solve(f, z0)
    raw = get_solver("anderson", safeguard=0.0, **kw).solve(f, z0)
    safe = get_solver("anderson", **kw).solve(f, z0)
    assert bool(plain.converged.all())
    assert float(raw.converged.float().mean()) < 0.1  # the bug: unguarded Anderson fails here
    assert bool(safe.converged.all())
    assert float(safe.steps.float().mean()) <= float(plain.steps.float().mean())
    # residual <= tol implies ||z - z*|| <= ||(I - A)^{-1}|| tol
    bound = float(torch.linalg.matrix_norm(torch.linalg.inv(torch.eye(d, dtype=torch.float64) - A_), 2)) * 1e-5
    assert float((safe.z - z_star).norm(dim=1).max()) <= bound * (1 + 1e-6)
    with pytest.raises(ConfigError):
        get_solver("anderson", safeguard=-1.0)


def test_safeguard_changes_nothing_on_a_well_behaved_contraction():
    torch.manual_seed(0)
    d = 32
    W = torch.randn(d, d, dtype=torch.float64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)
    u = torch.randn(16, d, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + u)
    z0 = torch.zeros(16, d, dtype=torch.float64)
    a = get_solver("anderson", max_iter=60, tol=1e-10, stop_mode="abs").solve(f, z0)
    b = get_solver("anderson", max_iter=60, tol=1e-10, stop_mode="abs", safeguard=0.0).solve(f, z0)
    assert bool(a.converged.all()) and bool(b.converged.all())
    assert abs(float(a.steps.float().mean()) - float(b.steps.float().mean())) <= 2


# -- also: a recipe that fixes its architecture refuses another --model --------------------------------
def test_train_refuses_a_model_the_defense_replaces(tmp_path):
    from robustdeq.cli import main
    try:
        rc = main(["train", "--model", "mon_deq", "--defense", "lyadeq", "--epochs", "1",
                   "--out", str(tmp_path / "o")])
    except ConfigError as e:  # library error surfaced as is
        assert "mon_deq" in str(e) and "lyadeq" in str(e)
    except SystemExit as e:
        assert e.code != 0
    else:
        assert rc != 0
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


class _CoinModel(nn.Module):
    """Two classes; the logit of class 1 is ``0.5 + 0.01 mean(x) + N(0, 1)`` per call: correct on
    label 1 with probability about 0.69 whatever the (small) perturbation."""

    randomized = True

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        s = 0.5 + 0.01 * self.w * x.flatten(1).mean(1) + torch.randn(x.shape[0], device=x.device)
        return torch.stack([torch.zeros_like(s), s], 1)


def test_a_randomized_model_is_not_reported_as_an_upper_bound():
    """Each unit judges its examples with a fresh draw and a sample counts as broken when any
    judgement misclassifies it: on a randomised model the robust accuracy is the worst of several
    draws, far below the model's expected accuracy at a radius too small to matter. The report
    called it an upper bound on the true robust accuracy."""
    torch.manual_seed(0)
    x = torch.full((300, 1, 2, 2), 0.5)
    y = torch.ones(300, dtype=torch.long)
    with _quiet():
        rep = evaluate(_CoinModel(), x, y, threat="Linf", eps=1e-3, suite=["pgd", "pgd-margin"], steps=2,
                       checks=False, seed=0)
    expected = float(torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(0.5)))   # about 0.69
    assert rep.robust_accuracy() < expected - 0.2
    assert "upper bound on the true robust accuracy" not in rep.bound_statement
    assert "random" in rep.bound_statement and "not an upper bound" in rep.bound_statement
    assert rep.to_dict()["bound"] == rep.bound_statement
