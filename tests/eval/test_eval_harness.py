"""The evaluation harness: suites, per-sample worst case, trajectory statistics, adaptive views,
resume, and the report (JSON, Markdown, plots, TensorBoard)."""
import json
import warnings

import pytest
import torch

from robustdeq.deq import zoo
from robustdeq.errors import ConfigError, GradientMaskingWarning, InputError, NonConvergenceWarning
from robustdeq.eval import AttackSpec, CheckConfig, EvalReport, evaluate
from robustdeq.eval.store import unit_seed
from robustdeq.eval.report import SCHEMA_VERSION

from helpers.evals import MaskedDefense



CHEAP_CHECKS = CheckConfig(subset=16, large_eps_steps=5, steps_short=3, steps_long=12,
                           black_box_queries=20)


@pytest.fixture(scope="module")
def deq(trained_deq):
    return trained_deq


@pytest.fixture(scope="module")
def mlp(trained_mlp):
    return trained_mlp


@pytest.fixture(scope="module")
def data(digits_test):
    return digits_test(64)


QUICK_STEPS = 2  # few steps: the bookkeeping is the subject here, not the attacks' strength


@pytest.fixture(scope="module")
def quick(deq, data):
    x, y = data
    return evaluate(deq, x, y, eps=[0.05, 0.1], suite="quick", steps=QUICK_STEPS, checks=False)


def _clean_correct(model, x, y):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        return model(x).argmax(1) == y


# -- worst case and per-attack accuracies ---------------------------------------------------------
def test_quick_suite_worst_case_bookkeeping(quick, deq, data):
    x, y = data
    cc = _clean_correct(deq, x, y)
    assert quick.clean_accuracy == pytest.approx(float(cc.float().mean()))
    assert quick.n_samples == 64 and quick.eps == [0.05, 0.1] and quick.threat == "Linf"
    for r in quick.results:
        assert [a.key for a in r.attacks] == ["pgd-ift", "pgd-unrolled", "apgd-ce", "apgd-t", "apgd-t3x3-stripes"]
        robust = torch.tensor(r.robust)
        assert r.robust_accuracy == pytest.approx(float(robust.float().mean()))
        assert not bool((robust & ~cc).any())  # robust implies clean-correct
        for i, f in enumerate(r.first_success):
            assert (f is None) == r.robust[i]
            assert (f == "clean") == (not bool(cc[i]))
        cum = [a.cumulative_accuracy for a in r.attacks]
        assert cum == sorted(cum, reverse=True) and cum[-1] == r.robust_accuracy
        assert r.robust_accuracy <= min(a.accuracy for a in r.attacks)
        assert sum(a.new_successes for a in r.attacks) == int(cc.sum()) - int(robust.sum())
    # a larger radius cannot leave more samples robust here
    assert quick.robust_accuracy(0.1) <= quick.robust_accuracy(0.05)
    assert quick.robust_accuracy(0.1) < quick.clean_accuracy


def test_attack_accuracy_matches_a_direct_run(quick, deq, data):
    """Oracle: the PGD-IFT unit equals PGD run by hand with the unit's derived seed."""
    from robustdeq.attacks import PGD
    x, y = data
    cc = _clean_correct(deq, x, y)
    e, steps = 0.1, QUICK_STEPS
    atk = PGD(deq, eps=e, alpha=2.5 * e / steps, steps=steps, norm="Linf", grad="ift",
              seed=unit_seed(0, 0.1, "pgd-ift"), restarts=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        x_adv = atk(x[cc], y[cc])
        acc = float((deq(x_adv).argmax(1) == y[cc]).float().sum()) / x.shape[0]
    assert quick.result(0.1).attack("pgd-ift").accuracy == pytest.approx(acc)
    d = quick.result(0.1).attack("pgd-ift").describe
    assert d["implementation"] == "robustdeq" and d["eps"] == 0.1 and d["grad"] == "ift"


def test_custom_suite_against_hand_computed_flags(mlp, data):
    """Deterministic attacks: the robust flags are the AND of hand-computed per-attack flags."""
    x, y = data
    pattern = (torch.arange(64).view(1, 1, 8, 8) % 3 - 1).float()

    class Shift:
        name = "shift"

        def __init__(self, eps, sign):
            self.eps, self.sign = eps, sign

        def __call__(self, xb, yb):
            return (xb + self.sign * self.eps * pattern).clamp(0, 1)

        def describe(self):
            return {"name": "shift", "implementation": "test", "eps": self.eps}

    def up(target, *, eps, norm, steps, seed):
        return Shift(eps, 1.0)

    down = AttackSpec("down", lambda target, *, eps, norm, steps, seed: Shift(eps, -1.0))
    rep = evaluate(mlp, x, y, eps=0.3, suite=[up, down], checks=False)
    cc = _clean_correct(mlp, x, y)
    ok_up = cc & _clean_correct(mlp, (x + 0.3 * pattern).clamp(0, 1), y)
    ok_down = cc & _clean_correct(mlp, (x - 0.3 * pattern).clamp(0, 1), y)
    r = rep.result()
    assert r.attack("up").accuracy == pytest.approx(float(ok_up.float().mean()))
    assert r.attack("down").accuracy == pytest.approx(float(ok_down.float().mean()))
    assert r.robust == (ok_up & ok_down).tolist()
    assert r.attack("up").describe["implementation"] == "test"
    assert rep.suite == ["up", "down"]


def test_config_hash_tracks_parameters_including_scalar_buffers(mlp, data):
    from robustdeq.eval.store import hash_model

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp
            self.register_buffer("temperature", torch.tensor(1.0))  # a 0-dim buffer

        def forward(self, x):
            return self.net(x) / self.temperature
    m = Scaled()
    h1 = hash_model(m)
    m.temperature.fill_(2.0)
    assert hash_model(m) != h1
    m.temperature.fill_(1.0)
    assert hash_model(m) == h1


def test_attack_leaving_the_ball_is_projected_and_noted(mlp, data):
    x, y = data

    def wild(target, *, eps, norm, steps, seed):
        return lambda xb, yb: torch.zeros_like(xb)  # far outside a 0.05 Linf ball

    rep = evaluate(mlp, x, y, eps=0.05, suite=[wild], checks=False)
    a = rep.result().attack("wild")
    assert a.violations == int(_clean_correct(mlp, x, y).sum())
    assert any("projected back" in n for n in rep.notes)


# -- trajectory statistics -----------------------------------------------------------------------
def test_per_state_accuracy_and_residual_curve(quick, deq, data):
    x, y = data
    max_iter = deq.solver_config.max_iter
    ps = quick.clean["per_state"]
    assert ps["steps"] == list(range(max_iter))
    # state 0 is the zero initial state: readout(0) predicts one class for every input
    with torch.no_grad():
        c0 = int(deq.readout(torch.zeros(1, 32)).argmax())
    assert ps["accuracy"][0] == pytest.approx(float((y == c0).float().mean()))
    # the last state is the converged iterate: its accuracy is the clean accuracy (+- 1 sample)
    assert abs(ps["accuracy"][-1] - quick.clean_accuracy) <= 1 / 64 + 1e-9
    # relative residual of z0 = 0 is ||f(0)|| / ||f(0)|| = 1 exactly
    rc = quick.clean["residual_curve"]
    assert len(rc) == max_iter and rc[0] == pytest.approx(1.0, abs=1e-6)
    assert rc[-1] < 1e-2 * rc[0]
    # the fraction still iterating: 1 at the start, never rising, and summing to the mean number
    # of solver steps (a sample counts at step k iff k < its steps)
    run = quick.clean["residual_running_fraction"]
    assert len(run) == max_iter and run[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(run, run[1:]))
    assert sum(run) == pytest.approx(quick.clean["solver"]["mean_steps"], abs=1e-9)
    assert quick.clean["residual_tolerance"]["tol"] == deq.solver_config.tol
    for r in quick.results:
        assert r.per_state["clean"] == ps["accuracy"]
        # the worst-case inputs are misclassified exactly for the non-robust samples
        assert abs(r.per_state["adversarial"][-1] - r.robust_accuracy) <= 2 / 64 + 1e-9
        assert r.solver["clean"] == quick.clean["solver"]
        assert set(r.solver["adversarial"]) >= {"mean_steps", "converged_fraction", "mean_residual"}
        assert len(r.residual_curve["adversarial"]) == max_iter


def test_weight_tied_model_uses_its_layers_and_own_gradient(data):
    x, y = data
    torch.manual_seed(0)
    m = zoo.build("weight_tied_mlp", hidden=16, depth=4).eval()
    rep = evaluate(m, x[:16], y[:16], eps=0.1, suite="quick", steps=3, checks=False)
    assert [a.key for a in rep.result().attacks] == ["pgd", "apgd-ce", "apgd-t", "apgd-t3x3-stripes"]
    assert rep.result().attack("pgd").describe["grad"] == "model default"
    ps = rep.clean["per_state"]
    assert ps["steps"] == [0, 1, 2, 3, 4]
    assert ps["accuracy"][-1] == pytest.approx(rep.clean_accuracy)  # last layer = the output
    assert rep.clean["solver"] is None and rep.result().solver is None
    assert any("full backpropagation" in n for n in rep.notes)


def test_feedforward_model_skips_deq_parts(mlp, data):
    x, y = data
    rep = evaluate(mlp, x[:32], y[:32], eps=0.1, suite="quick", steps=5, check_config=CHEAP_CHECKS)
    assert [a.key for a in rep.result().attacks] == ["pgd", "apgd-ce", "apgd-t", "apgd-t3x3-stripes"]
    assert rep.clean["per_state"] is None and rep.result().per_state is None
    assert rep.check("non_convergence").skipped and rep.check("estimator_disagreement").skipped
    assert any("no trajectory" in n for n in rep.notes)


def test_l2_threat(mlp, data):
    x, y = data
    rep = evaluate(mlp, x[:32], y[:32], threat="L2", eps=[0.5, 2.0], suite=["pgd"], steps=5, checks=False)
    assert rep.threat == "L2"
    assert rep.result(0.5).attack("pgd").describe["norm"] == "L2"
    assert rep.robust_accuracy(2.0) <= rep.robust_accuracy(0.5)


# -- defenses: adaptive views judged on the defense --------------------------------------------------
def test_defense_adaptive_views_are_attacked_and_judged_on_the_defense(deq, data):
    x, y = data
    x, y = x[:32], y[:32]
    defense = MaskedDefense(deq)
    # one PGD step and APGD's 5 iterations: enough to show the masking (the subject here), and
    # quick's every unit still runs on each view
    rep = evaluate(defense, x, y, eps=0.1, suite="quick", steps=1, checks=False)
    r = rep.result()
    assert [a.key for a in r.attacks] == [f"{p}{v}" for p in ("pgd-ift", "pgd-unrolled", "apgd-ce", "apgd-t",
                                                                   "apgd-t3x3-stripes")
                                          for v in ("", "@bpda", "@transfer-base")]
    assert r.attack("pgd-ift@bpda").view == "bpda"
    # PGD stops early on the judged model itself, never on a view (a view's success is not the
    # defense's)
    assert r.attack("pgd-ift").describe["early_stop"] is True
    assert r.attack("pgd-ift@bpda").describe["early_stop"] is False
    # the quantised defense masks the gradient; the BPDA view does not
    assert r.attack("pgd-ift@bpda").accuracy < r.attack("pgd-ift").accuracy
    assert r.robust_accuracy <= r.attack("pgd-ift@bpda").accuracy
    # judged on the defense: re-judge the BPDA examples by hand
    cc = _clean_correct(defense, x, y)
    assert rep.clean_accuracy == pytest.approx(float(cc.float().mean()))
    # trajectory statistics come from the underlying DEQ
    assert rep.clean["per_state"]["steps"] == list(range(deq.solver_config.max_iter))
    assert rep.provenance["model"]["defense"]["views"] == ["bpda", "transfer-base"]
    assert r.attack("pgd-ift@transfer-base").kind == "transfer"


# -- resume ----------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # 1 of 16 samples is 6%
def test_resume_gives_the_same_flags_as_an_uninterrupted_run(deq, data, tmp_path):
    x, y = data
    x, y = x[:16], y[:16]
    # quick's kinds of unit (APGD-T on 3 targets: resuming does not depend on how many)
    suite = ["pgd-ift", "pgd-unrolled", "apgd-ce", "apgd-t3"]
    kw = dict(eps=[0.05, 0.1], suite=suite, steps=2, check_config=CHEAP_CHECKS)
    full = evaluate(deq, x, y, out_dir=tmp_path / "a", **kw)

    def stop_after_first(info):
        if info["unit_index"] == 0 and info["eps_index"] == 0:
            raise Interrupt
    with pytest.raises(Interrupt):
        evaluate(deq, x, y, out_dir=tmp_path / "b", callback=stop_after_first, **kw)
    partial = sorted(p.name for p in (tmp_path / "b" / "partial").glob("e*_u*.json"))
    assert partial == ["e000_u000.json"]
    assert not (tmp_path / "b" / "report.json").exists()

    seen = []
    resumed = evaluate(deq, x, y, out_dir=tmp_path / "b", callback=seen.append, **kw)
    assert [s["resumed"] for s in seen] == [True] + [False] * (len(suite) * 2 - 1)  # units x 2 eps
    assert resumed.config_hash == full.config_hash
    for a, b in zip(full.results, resumed.results):
        assert a.robust == b.robust and a.first_success == b.first_success
        assert [t.accuracy for t in a.attacks] == [t.accuracy for t in b.attacks]
        assert a.per_state == b.per_state
    assert [(c.name, c.fired, c.value) for c in full.checks] == \
        [(c.name, c.fired, c.value) for c in resumed.checks]
    # a completed evaluation removes partial/ (the report holds the results); a third call
    # finds everything finished and returns the report
    assert not (tmp_path / "b" / "partial").exists()
    again = evaluate(deq, x, y, out_dir=tmp_path / "b", **kw)
    assert all(a.resumed for r in again.results for a in r.attacks)
    assert [r.robust for r in again.results] == [r.robust for r in full.results]
    assert EvalReport.load(tmp_path / "b").results[1].robust == full.results[1].robust


def test_resume_after_an_attack_crashed_mid_run(mlp, data, tmp_path, monkeypatch):
    """An attack that raises on its second call (the second unit) loses only that unit."""
    import robustdeq.attacks.pgd as pgd_mod
    x, y = data
    kw = dict(eps=[0.05, 0.2], suite=["pgd", "pgd-dlr"], steps=3, check_config=CHEAP_CHECKS)

    def pgd_dlr(target, *, eps, norm, steps, seed):
        from robustdeq.attacks import PGD
        return PGD(target, eps=eps, steps=steps, norm=norm, loss="dlr", seed=seed)
    kw["suite"] = ["pgd", pgd_dlr]
    full = evaluate(mlp, x, y, **kw)
    calls = {"n": 0}
    original = pgd_mod.PGD._perturb

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(self, *a, **k)
    monkeypatch.setattr(pgd_mod.PGD, "_perturb", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(mlp, x, y, out_dir=tmp_path, **kw)
    monkeypatch.setattr(pgd_mod.PGD, "_perturb", original)
    assert len(list((tmp_path / "partial").glob("e*_u*.json"))) == 1
    resumed = evaluate(mlp, x, y, out_dir=tmp_path, **kw)
    assert [[a.resumed for a in r.attacks] for r in resumed.results] == [[True, False], [False, False]]
    assert [r.robust for r in resumed.results] == [r.robust for r in full.results]
    assert [c.fired for c in resumed.checks] == [c.fired for c in full.checks]


def test_resume_refuses_a_different_configuration(mlp, data, tmp_path):
    x, y = data
    evaluate(mlp, x[:16], y[:16], eps=0.1, suite=["pgd"], steps=2, checks=False, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="different configuration"):
        evaluate(mlp, x[:16], y[:16], eps=0.2, suite=["pgd"], steps=2, checks=False, out_dir=tmp_path)
    rep = evaluate(mlp, x[:16], y[:16], eps=0.2, suite=["pgd"], steps=2, checks=False, out_dir=tmp_path,
                   resume=False)
    assert rep.eps == [0.2] and not rep.results[0].attacks[0].resumed


# -- the report -------------------------------------------------------------------------------------
def test_report_json_roundtrip_markdown_and_plots(quick, tmp_path):
    paths = quick.save(tmp_path)
    raw = (tmp_path / "report.json").read_text()

    def no_nan(c):
        raise AssertionError(f"non-strict JSON constant {c}")
    d = json.loads(raw, parse_constant=no_nan)
    assert d["schema_version"] == SCHEMA_VERSION == 1
    loaded = EvalReport.load(tmp_path)
    assert loaded.to_dict() == quick.to_dict()
    assert loaded.robust_accuracy(0.1) == quick.robust_accuracy(0.1)
    md = (tmp_path / "report.md").read_text()
    assert "| pgd-ift | white-box |" in md and "**worst case**" in md and "| 0.05 |" in md
    for name in ("accuracy_vs_eps", "accuracy_vs_step", "residuals"):
        with open(paths[name], "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    d["schema_version"] = 2
    (tmp_path / "report.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="schema_version"):
        EvalReport.load(tmp_path)
    with pytest.raises(InputError):
        EvalReport.load(tmp_path / "missing")
    # a malformed check entry is a malformed report too (InputError, like malformed results)
    d["schema_version"] = 1
    for bad in ({"name": "x", "fired": False, "message": "", "colour": 1}, {"fired": False}, "x"):
        d["checks"] = [bad]
        with pytest.raises(InputError, match="malformed report checks"):
            EvalReport.from_dict(d)


def test_tensorboard_scalars_read_back(quick, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # add_graph would raise one
        tags = quick.write_tensorboard(tmp_path)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(tags)
    rob = acc.Scalars("eval/robust_accuracy")
    assert [e.step for e in rob] == [0, 1]
    assert [e.value for e in rob] == pytest.approx([r.robust_accuracy for r in quick.results])
    st = acc.Scalars("state_accuracy/clean")
    assert [e.value for e in st] == pytest.approx(quick.clean["per_state"]["accuracy"])


def test_progress_bar_and_tensorboard_flag(mlp, data, tmp_path, capsys):
    x, y = data
    evaluate(mlp, x[:16], y[:16], eps=0.1, suite=["pgd"], steps=2, checks=False, progress=True,
             out_dir=tmp_path, tensorboard=True)
    assert "evaluate" in capsys.readouterr().err
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "report.md").is_file()


def test_provenance_and_timings(quick):
    p = quick.provenance
    assert p["versions"]["torch"] == torch.__version__
    assert set(p["versions"]) >= {"robustdeq", "torchattacks", "pyautoattack"}
    assert p["seed"] == 0 and p["threat"] == "Linf" and p["model"]["config"]["name"] == "mlp_deq"
    assert p["attacks"]["pgd-ift"]["implementation"] == "robustdeq"
    assert set(quick.timings) >= {"clean", "attacks", "trajectory", "total"}
    assert quick.timings["total"] >= quick.timings["attacks"] > 0


def test_training_flags_and_warning_switches_are_restored(data):
    x, y = data
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=16, solver={"max_iter": 3})
    m.train()
    m.head.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(m, x[:8], y[:8], eps=0.1, suite=["pgd"], steps=2, checks=False)
    assert m.training and m.cell.training and not m.head.training
    assert m.warn_nonconvergence is True


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_arguments_are_loud(mlp, data):
    x, y = data
    x, y = x[:4], y[:4]
    with pytest.raises(ConfigError, match="unknown suite"):
        evaluate(mlp, x, y, eps=0.1, suite="fast")
    with pytest.raises(ConfigError, match="unknown attack"):
        evaluate(mlp, x, y, eps=0.1, suite=["pgd", "nope"])
    with pytest.raises(ConfigError, match="eps"):
        evaluate(mlp, x, y, eps=0.0)
    with pytest.raises(ConfigError, match="distinct"):
        evaluate(mlp, x, y, eps=[0.1, 0.1])
    with pytest.raises(ConfigError, match="threat"):
        evaluate(mlp, x, y, threat="L1", eps=0.1)
    with pytest.raises(InputError):
        evaluate(mlp, x, y.float(), eps=0.1)
    with pytest.raises(InputError):
        evaluate(mlp, x * 3, y, eps=0.1)
    with pytest.raises(ConfigError, match="twice"):
        evaluate(mlp, x, y, eps=0.1, suite=["pgd", "pgd"])
    with pytest.raises(ConfigError, match="tensorboard"):
        evaluate(mlp, x, y, eps=0.1, tensorboard=True)
    with pytest.raises(ConfigError, match="steps"):
        evaluate(mlp, x, y, eps=0.1, steps=0)
    with pytest.raises(ConfigError, match="name"):
        evaluate(mlp, x, y, eps=0.1, suite=[lambda t, **k: None])
    rep = evaluate(mlp, (x, y), eps=0.1, suite=["pgd"], steps=1, checks=False)  # data=(x, y)
    assert rep.n_samples == 4


# -- the standard and full suites end to end (AutoAttack on a DEQ is slow) ---------------------------
@pytest.mark.slow
def test_standard_suite_end_to_end(deq, tmp_path, digits_test):
    x, y = digits_test(16)
    rep = evaluate(deq, x, y, eps=0.1, suite="standard", steps=10, out_dir=tmp_path)
    keys = [a.key for a in rep.result().attacks]
    assert keys[:6] == ["pgd-ift", "pgd-unrolled", "apgd-ce", "apgd-t", "apgd-t3x3-stripes", "square"] and keys[-1] == "state-ensemble"
    assert sum(k.startswith("state-") for k in keys) >= 3
    assert rep.result().attack("apgd-t").describe["implementation"] == "robustdeq"
    assert "autoattack" not in keys  # the native ensemble; pyautoattack is full's reference
    assert rep.robust_accuracy() <= min(a.accuracy for a in rep.result().attacks)
    assert (tmp_path / "report.json").is_file()


def test_full_suite_composition_and_transfer_unit(deq, data):
    from robustdeq.eval import SuiteContext, build_suite, trajectory_model
    ctx = SuiteContext(model=deq, trajectory_model=trajectory_model(deq), has_deq=True, solver_model=True,
                       randomized=False, horizon=10, max_state=deq.solver_config.max_iter - 1)
    names = [s.name for s in build_suite("full", ctx)]
    assert names == ["pgd-ift", "pgd-unrolled", "apgd-ce", "apgd-t", "apgd-t3x3-stripes", "square", "state-2",
                     "state-6", "state-9", "state-ensemble", "autoattack", "autoattack-plus",
                     "transfer-unrolled"]
    assert [s.name for s in build_suite("quick", ctx)] == names[:5]
    assert [s.name for s in build_suite("standard", ctx)] == names[:10]
    x, y = data
    with warnings.catch_warnings():  # a 3-step IFT PGD is weaker than the transfer: the check may fire
        warnings.simplefilter("ignore", GradientMaskingWarning)
        rep = evaluate(deq, x[:16], y[:16], eps=0.1, suite=["pgd-ift", "transfer-unrolled"], steps=3,
                       check_config=CheckConfig(enabled=("black_box_stronger",)))
    t = rep.result().attack("transfer-unrolled")
    assert t.kind == "transfer" and t.describe["grad"] == "model default"
    assert rep.check("black_box_stronger").details["source"] == "transfer-unrolled"


@pytest.mark.slow
def test_full_suite_end_to_end_in_cascade_mode(deq, digits_test):
    x, y = digits_test(8)
    rep = evaluate(deq, x, y, eps=0.1, suite="full", steps=5, cascade=True, check_config=CHEAP_CHECKS)
    keys = [a.key for a in rep.result().attacks]
    assert "autoattack-plus" in keys and "transfer-unrolled" in keys
    assert all(a.accuracy is None for a in rep.result().attacks)


def test_cascade_gives_the_same_worst_case(mlp, data):
    x, y = data
    pattern = (torch.arange(64).view(1, 1, 8, 8) % 5 - 2).float() / 2

    def make(sign):
        def factory(target, *, eps, norm, steps, seed):
            return lambda xb, yb: (xb + sign * eps * pattern).clamp(0, 1)
        return factory
    suite = [AttackSpec("up", make(1.0)), AttackSpec("down", make(-1.0))]
    plain = evaluate(mlp, x, y, eps=0.2, suite=suite, checks=False)
    casc = evaluate(mlp, x, y, eps=0.2, suite=suite, checks=False, cascade=True)
    assert casc.result().robust == plain.result().robust
    assert casc.result().first_success == plain.result().first_success
    assert [a.cumulative_accuracy for a in casc.result().attacks] == \
        [a.cumulative_accuracy for a in plain.result().attacks]
    assert [a.accuracy for a in casc.result().attacks] == [None, None]
    md = casc.to_markdown()
    assert "| up | white-box | not measured (cascade) |" in md and "accuracy alone is not measured" in md
    assert casc.config_hash != plain.config_hash
