"""Registries (solvers, attack specs, suites, recipes, objectives, the CLI's choices) and the typed
EvalProtocol / RunOptions / CertifyConfig."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from robustdeq import registry
from robustdeq.config import Norm, SolverConfig, from_dict, to_dict
from robustdeq.errors import ConfigError


@pytest.fixture
def cleanup():
    """Names registered by a test, removed afterwards (registries are process-wide)."""
    added = []
    yield added
    for reg, name in added:
        reg.unregister(name)


def _data(n=8, seed=0):
    from robustdeq.data import synthetic
    return synthetic(n, seed=seed)


def _ff():
    from robustdeq.deq import zoo
    torch.manual_seed(0)
    return zoo.build("ff_mlp", hidden=16)


# -- the registry class -----------------------------------------------------------------------------
def test_registry_unknown_duplicate_replace():
    reg = registry.Registry("widget", {"a": "robustdeq.config:Norm"})
    assert reg.names() == ["a"] and "a" in reg and reg.get("a") is Norm  # lazy built-in imported on use
    with pytest.raises(ConfigError, match=r"unknown widget 'b'; known: a"):
        reg.get("b")
    reg.register("b", 1)
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("b", 2)
    with pytest.raises(ConfigError, match="already built-in"):
        reg.register("a", 2)
    reg.register("a", 3, replace=True)
    assert reg.get("a") == 3
    with pytest.raises(ConfigError, match="built-in"):
        reg.unregister("a")
    reg.unregister("b")
    assert reg.names() == ["a"]

    @reg.register("c")
    def c():
        return 4
    assert reg.get("c") is c
    with pytest.raises(ConfigError, match="name"):
        reg.register("", 1)


def test_every_builtin_entry_resolves():
    """Each built-in "module:attribute" reference names a real object (imported on first use)."""
    for reg in (registry.SOLVERS, registry.ESTIMATORS, registry.ATTACK_SPECS, registry.SUITES, registry.RECIPES,
                registry.OBJECTIVES, registry.MODELS, registry.ATTACKS, registry.DATASETS,
                registry.WRAPPERS):
        for name in reg.names():
            if reg.is_builtin(name) and name != "none":
                assert callable(reg.get(name)) or hasattr(reg.get(name), "loader"), (reg.kind, name)
    assert registry.WRAPPERS.get("none") is None
    # every built-in attack spec of the suites is declared (by name) in the registry
    from robustdeq.eval.suites import BUILTIN_SPECS
    spec_names = registry.ATTACK_SPECS.names()
    assert set(BUILTIN_SPECS) == {n for n in spec_names if registry.ATTACK_SPECS.is_builtin(n)}


def test_each_registry_has_one_public_name():
    """A registry is public only as ``robustdeq.registry.<NAME>``: no module exports it again
    (in ``__all__`` or a package face's lazy table) under another path."""
    import ast
    root = Path(registry.__file__).parent
    names = {n for n in registry.__all__ if isinstance(getattr(registry, n), registry.Registry)}
    assert {"SOLVERS", "ESTIMATORS", "SUITES", "RECIPES", "OBJECTIVES", "ATTACK_SPECS"} <= names
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "registry.py":
            continue
        text = path.read_text()
        if not any(n in text for n in names):
            continue
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("__all__", "_LAZY") for t in node.targets):
                strings = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
                found += [f"{path.relative_to(root.parent)}: {n}" for n in sorted(strings & names)]
    assert not found, found


def test_names_are_known_without_torch():
    import subprocess
    import sys
    code = ("import sys, robustdeq.registry as r; "
            "names = [n for reg in (r.SOLVERS, r.ATTACK_SPECS, r.SUITES, r.RECIPES, r.OBJECTIVES, r.MODELS, "
            "r.ATTACKS, r.DATASETS, r.WRAPPERS) for n in reg.names()]; "
            "assert r.is_attack_spec_name('pgd-ift-margin') and r.is_attack_spec_name('state-3'); "
            "assert not r.is_attack_spec_name('state-x') and not r.is_attack_spec_name('nope'); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 30
    # the command line checks --suite and --attack against them, still without torch
    code = ("import sys; from robustdeq.cli import build_parser; p = build_parser(); "
            "a = p.parse_args(['eval', 'x.pt', '--suite', 'pgd-ift,state-3,apgd-ce']); "
            "b = p.parse_args(['attack', 'x.pt', '--attack', 'fgsm']); "
            "assert a.suite == ['pgd-ift', 'state-3', 'apgd-ce'] and b.attack == 'fgsm'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- models, attacks, datasets: one catalogue each -------------------------------------------------
def _shift_up_attack():
    from robustdeq.attacks.base import Attack

    class ShiftUp(Attack):
        """A toy attack: every pixel up by eps (then clipped), whatever the model."""
        name = "shift-up"

        def _perturb(self, x, y, gen):
            return (x + self.eps).clamp(0, 1)
    return ShiftUp


def test_registered_attack_builds_and_runs_from_the_cli(cleanup, tmp_path, capsys):
    from robustdeq import attacks
    from robustdeq.checkpoint import save_checkpoint
    from robustdeq.cli import main
    ShiftUp = _shift_up_attack()
    registry.ATTACKS.register("mine", ShiftUp)
    cleanup.append((registry.ATTACKS, "mine"))
    m = _ff()
    atk = attacks.build("mine", m, eps=0.1)
    assert isinstance(atk, ShiftUp) and atk.eps == 0.1
    x, y = _data(4)
    torch.testing.assert_close(atk(x, y), (x + 0.1).clamp(0, 1))
    with pytest.raises(ConfigError, match="unknown attack 'yours'.*mine"):
        attacks.build("yours", m, eps=0.1)

    ck = tmp_path / "ck.pt"
    save_checkpoint(ck, m, model_config=m.robustdeq_config, metadata={"dataset": "digits"})
    out = tmp_path / "adv.pt"
    assert main(["attack", str(ck), "--attack", "mine", "--eps", "0.05", "-n", "4", "--out", str(out),
                 "--no-progress"]) == 0
    d = torch.load(out, weights_only=True)
    torch.testing.assert_close(d["x_adv"], (d["x"] + 0.05).clamp(0, 1))
    assert "shift-up" in capsys.readouterr().out
    # the CLI's choices are the registry's: an unknown attack is a usage error naming "mine"
    with pytest.raises(SystemExit) as exc:
        main(["attack", str(ck), "--attack", "yours", "-n", "4", "--no-progress"])
    assert exc.value.code == 2
    assert "mine" in capsys.readouterr().err


def test_registered_model_builds_through_the_zoo(cleanup):
    from robustdeq.deq import zoo
    from robustdeq.deq.zoo import FeedForward

    @zoo.register("tiny_linear")
    def tiny_linear(in_shape=(1, 8, 8), num_classes=10):
        return FeedForward(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes)), in_shape)
    cleanup.append((registry.MODELS, "tiny_linear"))
    m = zoo.build("tiny_linear", num_classes=3)
    assert m.robustdeq_config == {"name": "tiny_linear", "options": {"num_classes": 3}}
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ConfigError, match="unknown option.*hidden"):
        zoo.build("tiny_linear", hidden=3)
    with pytest.raises(ConfigError, match="already built-in"):
        zoo.register("mlp_deq")(tiny_linear)
    with pytest.raises(ConfigError, match="unknown model 'nope'.*lyadeq"):
        zoo.build("nope")


# -- solvers ----------------------------------------------------------------------------------------
def test_registered_gradient_estimator_is_used_by_name(cleanup):
    """An estimator registered by name is what ``make_estimator`` / ``gradient`` / ``grad=`` use:
    the input gradient equals the one of the instance it stands for."""
    from robustdeq.deq import zoo
    from robustdeq.deq.grad import UnrolledGrad, gradient, make_estimator

    class Unrolled3(UnrolledGrad):
        def __init__(self):
            super().__init__(steps=3)

    registry.ESTIMATORS.register("unrolled3", Unrolled3)
    cleanup.append((registry.ESTIMATORS, "unrolled3"))
    assert isinstance(make_estimator("unrolled3"), Unrolled3)
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, grad="unrolled3").double().eval()
    assert isinstance(model.grad, Unrolled3)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)

    def input_grad(est):
        xr = x.clone().requires_grad_(True)
        with gradient(model, est):
            model(xr).logsumexp(1).sum().backward()
        return xr.grad
    assert torch.equal(input_grad("unrolled3"), input_grad(UnrolledGrad(steps=3)))
    assert not torch.equal(input_grad("unrolled3"), input_grad(UnrolledGrad(steps=1)))
    with pytest.raises(ConfigError, match="unknown gradient estimator 'nope'.*unrolled3"):
        make_estimator("nope")


def test_register_solver_end_to_end(cleanup):
    from robustdeq.deq.solvers import FixedPointIteration, get_solver, register_solver, solve

    class HalfStep(FixedPointIteration):
        """z <- (z + f(z)) / 2 whatever the damping."""

        def propose(self, state, z, fz, g):
            return 0.5 * (z + fz)

    register_solver("half_step", HalfStep)
    cleanup.append((registry.SOLVERS, "half_step"))
    assert HalfStep.name == "half_step"
    cfg = SolverConfig(name="half_step", max_iter=200, tol=1e-10, stop_mode="abs")
    assert cfg.name == "half_step" and cfg.name.value == "half_step"
    assert to_dict(cfg)["name"] == "half_step" and type(to_dict(cfg)["name"]) is str
    assert from_dict(SolverConfig, to_dict(cfg)) == cfg
    assert isinstance(get_solver("half_step"), HalfStep) and isinstance(get_solver(cfg), HalfStep)
    c = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    res = solve(lambda z: 0.5 * z + c, torch.zeros_like(c), cfg)
    torch.testing.assert_close(res.z, 2 * c, atol=1e-8, rtol=0)
    # a DEQ takes it like a built-in
    from robustdeq.deq import zoo
    deq = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.5)
    deq.solver_config = SolverConfig(name="half_step", max_iter=50)
    x, _ = _data(2)
    assert deq(x.float()).shape == (2, 10)

    with pytest.raises(ConfigError, match="already registered"):
        register_solver("half_step", HalfStep)
    with pytest.raises(ConfigError, match="already built-in"):
        register_solver("anderson", HalfStep)
    with pytest.raises(ConfigError, match="Solver subclass"):
        register_solver("bad", object)


def _relaxed_solver():
    from robustdeq.deq.solvers import FixedPointIteration

    class Relaxed(FixedPointIteration):
        """z <- z + relax (f(z) - z), with its own option ``relax`` in (0, 1]."""

        OPTIONS = {"relax": 1.0}

        @classmethod
        def check_options(cls, options):
            if "relax" in options and not 0 < options["relax"] <= 1:
                raise ConfigError(f"relax must be in (0, 1], got {options['relax']}")

        def propose(self, state, z, fz, g):
            return z + self.option("relax") * (fz - z)
    return Relaxed


def test_a_registered_solver_takes_its_own_options(cleanup):
    from robustdeq.deq.solvers import get_solver, register_solver, solve
    Relaxed = register_solver("relaxed", _relaxed_solver())
    cleanup.append((registry.SOLVERS, "relaxed"))
    c = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    for r, k in ((0.5, 7), (1.0, 4)):
        cfg = SolverConfig(name="relaxed", max_iter=k, tol=0.0, select="last", options={"relax": r})
        res = solve(lambda z: 0.5 * z + c, torch.zeros_like(c), cfg)
        # z_{j+1} = (1 - r/2) z_j + r c from 0: z_j = 2 c (1 - (1 - r/2)^j); k evaluations of f
        # return the last evaluated iterate, z_{k-1}; the same as fixed_point with damping r
        torch.testing.assert_close(res.z, 2 * c * (1 - (1 - r / 2) ** (k - 1)), atol=1e-12, rtol=0)
        ref = solve(lambda z: 0.5 * z + c, torch.zeros_like(c),
                    SolverConfig(name="fixed_point", damping=r, max_iter=k, tol=0.0, select="last"))
        torch.testing.assert_close(res.z, ref.z, atol=1e-15, rtol=0)
    assert get_solver("relaxed").option("relax") == 1.0  # the declared default
    cfg = SolverConfig(name="relaxed", options={"relax": 0.25})
    assert to_dict(cfg)["options"] == {"relax": 0.25} and from_dict(SolverConfig, to_dict(cfg)) == cfg
    assert hash(cfg) == hash(SolverConfig(name="relaxed", options={"relax": 0.25}))
    assert cfg.replace(options={"relax": 0.5}).options == {"relax": 0.5}
    with pytest.raises(TypeError, match="read-only"):
        cfg.options["relax"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown option.*solver 'relaxed'.*omega.*relax"):
        SolverConfig(name="relaxed", options={"omega": 0.5})
    with pytest.raises(ConfigError, match=r"relax must be in \(0, 1\]"):
        SolverConfig(name="relaxed", options={"relax": 2.0})
    with pytest.raises(ConfigError, match="unknown option.*solver 'anderson'"):
        SolverConfig(name="anderson", options={"relax": 0.5})  # the built-ins declare none
    with pytest.raises(ConfigError, match="mapping"):
        SolverConfig(name="relaxed", options=[("relax", 0.5)])


def test_unknown_solver_names_the_known_ones():
    from robustdeq.deq.solvers import get_solver
    with pytest.raises(ConfigError, match="unknown solver 'newton'.*anderson"):
        SolverConfig(name="newton")
    with pytest.raises(ConfigError, match="unknown solver"):
        get_solver("newton")


# -- attack specs and suites ------------------------------------------------------------------------
def test_register_suite_and_attack_spec_end_to_end(cleanup):
    from robustdeq.eval import AttackSpec, evaluate, register_attack_spec, register_suite
    from robustdeq.eval.suites import _pgd_factory

    @register_attack_spec("pgd-toy")
    def pgd_toy(ctx):
        return AttackSpec("pgd-toy", _pgd_factory(None, ctx.model), description="toy PGD")
    cleanup.append((registry.ATTACK_SPECS, "pgd-toy"))
    register_suite("toy", ["pgd-toy", "pgd"])
    cleanup.append((registry.SUITES, "toy"))

    m = _ff()
    x, y = _data(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = evaluate(m, x, y, eps=0.1, suite="toy", steps=2, checks=False)
    assert rep.suite == "toy" and [a.key for a in rep.results[0].attacks] == ["pgd-toy", "pgd"]

    from robustdeq.cli import build_parser
    args = build_parser().parse_args(["eval", "ck.pt", "--suite", "toy"])
    assert args.suite == "toy"

    with pytest.raises(ConfigError, match="already built-in"):
        register_suite("quick", ["pgd"])
    with pytest.raises(ConfigError, match="already built-in"):
        register_attack_spec("pgd", pgd_toy)
    with pytest.raises(ConfigError, match="non-empty list"):
        register_suite("empty", [])
    with pytest.raises(ConfigError, match=r"unknown suite 'nope'; known: quick, standard, full, toy"):
        evaluate(m, x, y, eps=0.1, suite="nope")
    with pytest.raises(ConfigError, match="unknown attack 'nope'"):
        evaluate(m, x, y, eps=0.1, suite=["nope"])


def test_suite_function_sees_the_model(cleanup):
    from robustdeq.eval import SuiteContext, build_suite, register_suite
    register_suite("by-model", lambda ctx: ["pgd-ift"] if ctx.has_deq else ["pgd"])
    cleanup.append((registry.SUITES, "by-model"))
    m = _ff()
    ctx = SuiteContext(model=m, trajectory_model=None, has_deq=False, solver_model=False, randomized=False,
                       horizon=None, max_state=None)
    assert [s.name for s in build_suite("by-model", ctx)] == ["pgd"]


# -- recipes and objectives -------------------------------------------------------------------------
def test_register_recipe_and_objective(cleanup):
    from robustdeq.defenses.objectives import CrossEntropy, make_objective, register_objective
    from robustdeq.defenses.recipes import Recipe, recipe, register_recipe

    register_objective("toy_ce", CrossEntropy)
    cleanup.append((registry.OBJECTIVES, "toy_ce"))
    assert isinstance(make_objective("toy_ce"), CrossEntropy)
    with pytest.raises(ConfigError, match="unknown option"):
        make_objective("toy_ce", nope=1)

    @register_recipe("toy-recipe")
    def toy(**options):
        return Recipe("toy-recipe", None, make_objective("toy_ce", **options))
    cleanup.append((registry.RECIPES, "toy-recipe"))
    rec = recipe("toy-recipe")
    assert rec.name == "toy-recipe" and isinstance(rec.objective, CrossEntropy)
    m = _ff()
    x, y = _data(4)
    loss, scalars = rec.objective(m, x, y)
    assert torch.isfinite(loss) and "loss" in scalars

    import argparse
    from robustdeq.cli import build_parser
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert "toy-recipe" in sub.choices["train"].format_help()

    with pytest.raises(ConfigError, match="already built-in"):
        register_recipe("pgd-at", toy)
    with pytest.raises(ConfigError, match="already built-in"):
        register_objective("ce", CrossEntropy)
    with pytest.raises(ConfigError, match="unknown defense 'magic'; known: none, pgd-at"):
        recipe("magic")
    with pytest.raises(ConfigError, match="unknown objective 'magic'; known: ce"):
        make_objective("magic")


def test_builtin_recipes_unchanged():
    from robustdeq.defenses.objectives import PGDAT, TRADES
    from robustdeq.defenses.recipes import recipe
    r = recipe("pgd-at-random-state", eps=0.1, steps=2)
    assert isinstance(r.objective, PGDAT) and r.objective.state == "random" and r.model is None
    r = recipe("trades", eps=0.1, steps=2)
    assert isinstance(r.objective, TRADES) and r.objective.state is None
    assert recipe("lyadeq").model == "lyadeq"


# -- the CLI reads its choices from the registries --------------------------------------------------
def test_cli_choices_come_from_the_registries(cleanup):
    import argparse
    from robustdeq.cli import build_parser
    from robustdeq.deq.solvers import Anderson, register_solver

    class Toy(Anderson):
        pass
    register_solver("toy_solver", Toy)
    cleanup.append((registry.SOLVERS, "toy_solver"))
    registry.WRAPPERS.register("toy-wrap", object)
    cleanup.append((registry.WRAPPERS, "toy-wrap"))
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    def choices(cmd, flag):
        return next(a.choices for a in sub[cmd]._actions if flag in a.option_strings)

    assert list(choices("harden", "--suite")) == registry.SUITES.names()
    # eval --suite: a suite or a comma list of attack names; the suites are named in its help
    assert all(name in sub["eval"].format_help() for name in registry.SUITES.names())
    assert p.parse_args(["eval", "x.pt", "--suite", registry.SUITES.names()[-1]]).suite == registry.SUITES.names()[-1]
    assert list(choices("eval", "--wrap")) == registry.WRAPPERS.names() and "toy-wrap" in choices("eval", "--wrap")
    assert list(choices("train", "--dataset")) == registry.DATASETS.names()
    assert list(choices("certify", "--dataset")) == registry.DATASETS.names()
    assert "toy_solver" in choices("federate", "--solver")
    assert list(choices("eval", "--norm")) == [n.value for n in Norm]
    for name in registry.ATTACKS.names():
        assert name in sub["attack"].format_help()
    for name in ("mlp_deq", "lyadeq"):
        assert name in sub["train"].format_help()


# -- EvalProtocol / RunOptions ---------------------------------------------------------------------
def test_eval_protocol_round_trip_and_unknown_keys():
    from robustdeq.eval import CheckConfig, EvalProtocol, RunOptions
    cfg = EvalProtocol(eps=[0.1, 0.2], threat="L2", suite=["pgd"], steps=3)
    assert cfg.threat is Norm.L2 and cfg.threat == "L2" and cfg.norm == "L2"
    assert cfg.eps == (0.1, 0.2) and cfg.suite == ("pgd",)
    run = RunOptions(check_config={"subset": 4}, out_dir="somewhere")
    assert isinstance(run.check_config, CheckConfig) and run.check_config.subset == 4
    assert run.out_dir == Path("somewhere")
    d = cfg.to_dict()
    assert d["threat"] == "L2" and d["eps"] == [0.1, 0.2]
    assert from_dict(EvalProtocol, d) == cfg
    assert EvalProtocol(eps=0.1, threat=Norm.LINF) == EvalProtocol(eps=0.1, threat="Linf")
    with pytest.raises(ConfigError, match="unknown option.*stepz.*known options"):
        EvalProtocol(eps=0.1, stepz=3)
    with pytest.raises(ConfigError, match="unknown option.*stepz"):
        from_dict(EvalProtocol, {"eps": 0.1, "stepz": 3})
    with pytest.raises(ConfigError, match="unknown option.*out_dir"):
        EvalProtocol(eps=0.1, out_dir="x")  # a run option, not part of the protocol
    with pytest.raises(ConfigError, match="threat"):
        EvalProtocol(eps=0.1, threat="L1")
    with pytest.raises(ConfigError, match="eps"):
        EvalProtocol()
    with pytest.raises(ConfigError, match="steps"):
        EvalProtocol(eps=0.1, steps=0)
    with pytest.raises(ConfigError, match="cascade"):
        from_dict(EvalProtocol, {"eps": 0.1, "cascade": "yes"})
    with pytest.raises(ConfigError, match="tensorboard"):
        RunOptions(tensorboard=True)
    with pytest.raises(ConfigError, match="progress"):
        RunOptions(progress="yes")


def test_eval_protocol_is_hashable_and_equal_protocols_hash_alike():
    from robustdeq.eval import AttackSpec, EvalProtocol
    a = EvalProtocol(eps=[0.1, 0.2], suite=["pgd", "pgd-margin"], steps=3)
    b = EvalProtocol(eps=(0.1, 0.2), suite=("pgd", "pgd-margin"), steps=3, threat="Linf")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != a.replace(seed=1) and a != a.replace(eps=(0.1,)) and a != a.replace(batch_size=64)
    spec = AttackSpec("mine", lambda target, *, eps, norm, steps, seed: None)
    assert hash(EvalProtocol(eps=0.1, suite=[spec, "pgd"])) == hash(EvalProtocol(eps=0.1, suite=(spec, "pgd")))


def test_evaluate_config_equals_keywords():
    from robustdeq.eval import EvalProtocol, evaluate
    m = _ff()
    x, y = _data(8)
    kw = dict(eps=[0.05, 0.2], suite=["pgd", "pgd-margin"], steps=2, seed=3, batch_size=4, threat="L2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = evaluate(m, x, y, **kw, checks=False)
        b = evaluate(m, x, y, config=EvalProtocol(**kw), checks=False)
        c = evaluate(m, x, y, config={**kw, "checks": True}, checks=False)  # options override the config
    for other in (b, c):
        assert other.config_hash == a.config_hash and other.threat == a.threat == "L2"
        assert [r.robust for r in other.results] == [r.robust for r in a.results]
        assert [r.first_success for r in other.results] == [r.first_success for r in a.results]
        assert other.checks == a.checks == []
    with pytest.raises(ConfigError, match="unknown option"):
        evaluate(m, x, y, eps=0.1, stepz=2)
    with pytest.raises(ConfigError, match="EvalProtocol or a mapping"):
        evaluate(m, x, y, config=3)


def test_the_report_hash_is_the_protocols_not_the_run_options(tmp_path):
    from robustdeq.eval import evaluate
    m = _ff()
    x, y = _data(6)
    kw = dict(eps=[0.1], suite=["pgd"], steps=1, seed=0, batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = evaluate(m, x, y, **kw, checks=False)
        b = evaluate(m, x, y, **kw, checks=True, progress=False, out_dir=tmp_path / "b", resume=False)
        c = evaluate(m, x, y, **{**kw, "seed": 1}, checks=False)
        d = evaluate(m, x, y, **{**kw, "batch_size": 2}, checks=False)
    assert a.config_hash == b.config_hash
    assert len({a.config_hash, c.config_hash, d.config_hash}) == 3


# -- CertifyConfig ----------------------------------------------------------------------------------
def test_certify_config_round_trip_and_unknown_keys():
    from robustdeq.certify import CertifyConfig
    cfg = CertifyConfig(eps_l2=0.5, eps_linf=[0.01], methods=["local"], solver={"name": "anderson"})
    assert cfg.eps_l2 == (0.5,) and cfg.eps_linf == (0.01,) and cfg.methods == ("local",)
    assert from_dict(CertifyConfig, cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown option.*eps_l1"):
        CertifyConfig(eps_l1=0.1)
    with pytest.raises(ConfigError, match="unknown certification method"):
        CertifyConfig(methods=["magic"])
    with pytest.raises(ConfigError, match="lyapunov_dynamics"):
        from_dict(CertifyConfig, {"lyapunov_dynamics": "ode"})
    with pytest.raises(ConfigError, match="batch_size"):
        CertifyConfig(batch_size=0)


def test_certify_config_equals_keywords():
    from robustdeq.certify import CertifyConfig, certify
    from robustdeq.deq import zoo
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.5)
    x, y = _data(4)
    kw = dict(eps_l2=(0.05, 0.1), methods=["lipschitz"], batch_size=2)
    a = certify(model, x.float(), y, **kw)
    b = certify(model, x.float(), y, CertifyConfig(**kw))
    assert [r.radius for r in a.results] == [r.radius for r in b.results]
    assert a.summary == b.summary and a.settings == b.settings
    with pytest.raises(ConfigError, match="unknown option"):
        certify(model, x.float(), y, eps_l3=0.1)
