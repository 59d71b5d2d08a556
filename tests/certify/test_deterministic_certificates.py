"""Certificates against cases with known answers (no training): robustdeq.certify."""
import json
import math
import warnings

import pytest
import torch

from robustdeq.certify import (CertReport, CertResult, certify, contraction_certificate, ibp_certify,
                               jacobian_spectrum, lipschitz_bound, local_stability, lyapunov_decrease,
                               quadratic_candidate, spectral_norm_bound)
from robustdeq.deq import linalg
from robustdeq.certify.oracles import linear_deq
from robustdeq.deq.cells import LinearCell
from robustdeq import ImplicitGrad, gradient
from robustdeq.deq import zoo
from robustdeq.deq.cells import LinearHead, MLPCell, MLPInjection
from robustdeq.deq.model import DEQClassifier
from robustdeq.errors import CertificationWarning, ConfigError, InputError

TIGHT = {"name": "anderson", "max_iter": 300, "tol": 1e-11, "stop_mode": "abs"}


def _nonnormal(d=6, seed=1):
    """Upper-triangular: rho = 0.5 (diagonal), ||A||_2 > 1 (large off-diagonal)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.triu(torch.randn(d, d, generator=g, dtype=torch.float64), 1) * 0.8
    A += torch.diag(torch.tensor([0.5, 0.3, -0.2, 0.1, 0.4, 0.0], dtype=torch.float64)[:d])
    return A


def _with_norm(d=6, top=0.6, seed=2):
    g = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.linspace(top, 0.1, d, dtype=torch.float64)
    return Q1 @ torch.diag(s) @ Q2.t()


def _inputs(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g)).double()


# ------------------------------------------------------------------------------------- linalg
def test_spectral_norm_bounds_bracket_the_exact_norm():
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 5), (7, 3), (3, 9), (40, 40)]:
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        exact = float(torch.linalg.svdvals(W)[0])
        for method in ("svd", "gram"):
            nb = spectral_norm_bound(W, method)
            assert nb.lower <= exact <= nb.upper
        svd = spectral_norm_bound(W, "svd")
        assert svd.upper == pytest.approx(exact, rel=1e-8) and svd.exact
        gram = spectral_norm_bound(W, "gram")
        r = min(shape)
        assert gram.upper <= exact * r ** (1 / 2 ** 9) * (1 + 1e-8)   # 8 squarings
        assert not gram.exact
        assert linalg.power_lower(W) <= exact


def test_power_iteration_alone_is_a_lower_bound_and_gram_corrects_it():
    # two nearly equal top singular values and a start vector orthogonal to the top one: the
    # power estimate after 1 step is far below the norm; the Gram bound is still above it
    W = torch.diag(torch.tensor([1.0, 0.999, 0.5], dtype=torch.float64))
    low = linalg.power_lower(W, iters=1)
    up = linalg.gram_upper(W, squarings=10)
    assert low <= 1.0 <= up <= 1.0 * 3 ** (1 / 2 ** 11) + 1e-9


# ----------------------------------------------------------------------------- linear oracle
def test_linear_nonnormal_exact_norm_and_radius_and_no_contraction():
    A = _nonnormal()
    norm, rho = float(torch.linalg.matrix_norm(A, 2)), float(torch.linalg.eigvals(A).abs().max())
    assert norm > 1.0 and rho == pytest.approx(0.5) and norm > 2 * rho
    model = linear_deq(A, num_classes=3)
    cert = contraction_certificate(model)
    assert not cert.certified
    assert cert.lip_z == pytest.approx(norm, rel=1e-8) and cert.exact
    assert cert.details["spectral_radius"] == pytest.approx(rho, rel=1e-10)
    assert cert.details["well_posed_linear"]
    # local spectrum at z*: dense is exact, power iteration approximates
    x = _inputs(4)
    model.double()
    dense = local_stability(model, x, method="dense", solver=TIGHT)
    assert dense.exact
    torch.testing.assert_close(dense.sigma, torch.full((4,), norm, dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(dense.rho, torch.full((4,), rho, dtype=torch.float64), rtol=1e-10, atol=0)
    assert bool(dense.stable.all()) and not bool(dense.contractive.any())
    power = local_stability(model, x, method="power", iters=200, solver=TIGHT)
    assert not power.exact
    assert bool((power.sigma <= norm * (1 + 1e-9)).all())          # a lower estimate
    torch.testing.assert_close(power.sigma, torch.full((4,), norm, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(power.rho, torch.full((4,), rho, dtype=torch.float64), rtol=1e-3, atol=0)


def test_linear_exact_lipschitz_and_certified_radius_is_the_distance_to_the_boundary():
    A = _with_norm(top=0.6)
    model = linear_deq(A, num_classes=3, std=0.5).double()
    cert = contraction_certificate(model)
    assert cert.certified and cert.lip_z == pytest.approx(0.6, rel=1e-8)
    bound = lipschitz_bound(model)
    assert bound.available and bound.exact and bound.method == "linear (exact)"
    U = model.injection.linear.weight.detach().double() / 0.5
    Wo = model.head.linear.weight.detach().double()
    K = torch.linalg.inv(torch.eye(6, dtype=torch.float64) - A)
    J = Wo @ K @ U
    assert bound.lip_logits == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-8)
    # independent check: the autograd Jacobian of x -> logits of the float64 model
    x = _inputs(1)
    with gradient(model, ImplicitGrad(solver=TIGHT)):
        Jx = torch.autograd.functional.jacobian(lambda t: model(t.view(1, 1, 8, 8)).squeeze(0), x.flatten())
    torch.testing.assert_close(Jx, J, rtol=1e-8, atol=1e-10)
    # the generic contraction bound is an over-estimate of the exact constant
    generic = float(torch.linalg.matrix_norm(Wo, 2)) * float(torch.linalg.matrix_norm(U, 2)) / (1 - 0.6)
    assert generic >= bound.lip_logits
    # the certified radius is the exact distance to the decision boundary
    xs = _inputs(6)
    rep = certify(model, xs, methods=["lipschitz"], solver=TIGHT)
    for i, r in enumerate(rep.results):
        rad, j, yhat = r.radius, r.details["runner_up"], r.details["pred"]
        assert rad > 0
        c = (Wo[yhat] - Wo[j]) @ K @ U
        d = -(c / c.norm()).view(1, 1, 8, 8)

        def pred_at(t):
            with torch.no_grad():
                u = model.inject(xs[i:i + 1] + t * d)
                return int(model.readout(model.solve(u, solver=TIGHT).z).argmax())
        assert pred_at(rad * (1 - 1e-6)) == yhat
        assert pred_at(rad * (1 + 1e-6)) != yhat


# --------------------------------------------------------------------------- expansive cell
def _expansive(hidden=8):
    torch.manual_seed(0)
    cell = MLPCell(hidden, act="tanh")
    with torch.no_grad():
        cell.W.linear.weight.copy_(1.5 * torch.eye(hidden))
    return DEQClassifier(MLPInjection(64, hidden), cell, LinearHead(hidden, 3), input_shape=(1, 8, 8),
                         warn_nonconvergence=False)


def test_expansive_cell_is_not_certified_and_truly_has_two_fixed_points():
    model = _expansive().double()
    cert = contraction_certificate(model)
    assert not cert.certified and cert.lip_z >= 1.5 and "no contraction certificate" in cert.reason
    u = torch.zeros(1, 8, dtype=torch.float64)
    zp, zm = torch.full((1, 8), 0.5, dtype=torch.float64), torch.full((1, 8), -0.5, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(200):
            zp, zm = model.f(zp, u), model.f(zm, u)
        assert float((zp - model.f(zp, u)).norm()) < 1e-12 and float((zm - model.f(zm, u)).norm()) < 1e-12
    assert float((zp - zm).norm()) > 1.0                     # two distinct fixed points for one input
    # z = 0 is a third fixed point, locally unstable: rho(J) = 1.5
    loc = local_stability(model, u=u, z=torch.zeros(1, 8, dtype=torch.float64), method="dense")
    assert float(loc.rho[0]) == pytest.approx(1.5) and not bool(loc.stable[0])
    assert not lipschitz_bound(model).available
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CertificationWarning)
        rep = certify(model, _inputs(4), eps_linf=(0.01,))
    assert all(r.radius == 0.0 and r.bound is None for r in rep.results)
    assert rep.global_certificates["contraction"]["certified"] is False
    assert all(not r.details["linf"]["0.01"]["certified"] for r in rep.results)


# ----------------------------------------------------------------------------- monotone cell
def test_monotone_certificate_and_convergence_from_random_starts():
    torch.manual_seed(0)
    model = zoo.build("mon_deq", hidden=16, m=0.5)
    cert = contraction_certificate(model)
    assert cert.certified and cert.monotone_m >= 0.5 - 1e-9
    cell = model.cell
    eye = torch.eye(16, dtype=torch.float64)
    Wd = cell.W().detach().double()
    lam = float(torch.linalg.eigvalsh(eye - 0.5 * (Wd + Wd.t()))[0])
    assert cert.monotone_m == pytest.approx(lam, abs=1e-8)
    assert cert.lip_z <= cell.contraction_rate() + 1e-9
    assert "forward_backward" in cert.solvers and "fixed_point" in cert.solvers
    work = model.double()
    with torch.no_grad():
        u = work.inject(_inputs(3))
        z_ref = work.solve(u, solver=TIGHT).z
        g = torch.Generator().manual_seed(5)
        for trial in range(4):
            z = 10 * torch.randn(3, 16, generator=g, dtype=torch.float64)
            e0 = (z - z_ref).norm(dim=1)
            for k in range(1, 301):
                z = work.f(z, u)
                ek = (z - z_ref).norm(dim=1)
                assert bool((ek <= cert.lip_z ** k * e0 * (1 + 1e-9) + 1e-10).all())
            assert float(ek.max()) < 1e-9                    # same fixed point from every start
    # Pabbaraju bound: ||z*(x1) - z*(x2)|| <= (||U|| / m) ||x1 - x2||
    bound = lipschitz_bound(work, cert)
    assert bound.available and "monotone" in bound.method
    x1, x2 = _inputs(16, seed=7), _inputs(16, seed=8)
    with torch.no_grad():
        d1 = work.solve(work.inject(x1), solver=TIGHT).z
        d2 = work.solve(work.inject(x2), solver=TIGHT).z
    ratio = (d1 - d2).norm(dim=1) / (x1 - x2).flatten(1).norm(dim=1)
    assert bool((ratio <= bound.lip_x_z).all())


# ------------------------------------------------------------------- contractive MLP soundness
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_contractive_mlp_bound_dominates_the_exact_jacobian(act):
    torch.manual_seed(1)
    model = zoo.build("mlp_deq", hidden=16, act=act, norm="spectral", scale=0.8, std=0.3,
                      solver=TIGHT).double().eval()
    cert = contraction_certificate(model)
    # torch's spectral_norm divides by a power-iteration estimate sigma_hat <= sigma: the
    # normalised weight's true norm is >= scale (here about 0.83), which is why the certificate
    # recomputes it exactly instead of trusting "scale"
    assert cert.certified and 0.8 * (1 - 1e-9) <= cert.lip_z < 1
    exact_w = float(torch.linalg.matrix_norm(model.cell.weight_matrix().detach().double(), 2))
    assert cert.lip_z == pytest.approx(exact_w, rel=1e-8)
    gram = contraction_certificate(model, spectral="gram")           # the SVD-free sound bound
    assert exact_w <= gram.lip_z <= exact_w * 16 ** (1 / 2 ** 9) * (1 + 1e-8) and not gram.exact
    bound = lipschitz_bound(model, cert)
    for x in _inputs(3, seed=11):
        with gradient(model, ImplicitGrad(solver=TIGHT)):
            J = torch.autograd.functional.jacobian(lambda t: model(t.view(1, 1, 8, 8)).squeeze(0), x.flatten())
        assert float(torch.linalg.matrix_norm(J, 2)) <= bound.lip_logits
        for i in range(10):
            for j in range(10):
                if i != j:
                    assert float((J[i] - J[j]).norm()) <= float(bound.pair[i, j]) * (1 + 1e-5)


def test_conv_cell_not_certifiable_globally_but_local_spectrum_works():
    torch.manual_seed(0)
    model = zoo.build("conv_deq", in_shape=(1, 4, 4), channels=4, groups=2).double().eval()
    cert = contraction_certificate(model)
    assert not cert.certified and "GroupNorm" in cert.reason
    assert not lipschitz_bound(model).available
    x = _inputs(2)[:, :, :4, :4]
    solver = {"name": "anderson", "max_iter": 200, "tol": 1e-10, "stop_mode": "abs"}
    dense = local_stability(model, x, method="dense", solver=solver)
    power = local_stability(model, x, method="power", iters=300, solver=solver)
    assert dense.exact and dense.sigma.shape == (2,)
    assert bool((power.sigma <= dense.sigma * (1 + 1e-9)).all())
    torch.testing.assert_close(power.sigma, dense.sigma, rtol=1e-3, atol=0)
    assert bool((dense.rho <= dense.sigma * (1 + 1e-9)).all())


def test_jacobian_spectrum_of_a_rotation_power_estimate():
    # complex dominant eigenvalues (rotation scaled by 0.7): plain power iteration does not settle,
    # the growth-rate estimate still finds rho = 0.7
    c, s = math.cos(0.9), math.sin(0.9)
    R = 0.7 * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    A = torch.block_diag(R, 0.2 * torch.eye(2, dtype=torch.float64))
    z = torch.zeros(3, 4, dtype=torch.float64)
    sigma, rho, exact, _ = jacobian_spectrum(lambda t: t @ A.t(), z, method="power", iters=120)
    torch.testing.assert_close(rho, torch.full((3,), 0.7, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(sigma, torch.full((3,), 0.7, dtype=torch.float64), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------- Lyapunov
def test_lyapunov_quadratic_fails_and_discrete_lyapunov_P_gives_exact_margin():
    A = _nonnormal()
    model = linear_deq(A, num_classes=3).double()
    x = _inputs(2)
    _, _, Vh = torch.linalg.svd(A)
    e0 = Vh[0].expand(2, 6).clone()                     # top right singular vector: ||A e0|| = ||A||
    quad = lyapunov_decrease(model, x, "quadratic", steps=20, perturb=e0)
    assert not bool(quad.stable.any())                   # V increases at the first step
    P = torch.zeros(6, 6, dtype=torch.float64)
    Ak = torch.eye(6, dtype=torch.float64)
    for _ in range(400):
        P += Ak.t() @ Ak
        Ak = A @ Ak
    # A^T P A - P = -I: V_P(e) - V_P(A e) = ||e||^2 exactly
    res = lyapunov_decrease(model, x, quadratic_candidate(P), steps=20, perturb=e0)
    assert bool(res.stable.all())
    e = e0[0]
    norms = []
    for _ in range(20):
        norms.append(float(e @ e))
        e = A @ e
    counted = [v for v, vk in zip(norms, res.values[:-1, 0].tolist()) if vk > max(1e-14, 1e-10 * float(res.values[0, 0]))]
    assert float(res.margin[0]) == pytest.approx(min(counted), rel=1e-6)


class _LyaModel(DEQClassifier):
    def lyapunov(self, z, z_ref):
        return ((z - z_ref) ** 2).sum(dim=1)


def test_model_lyapunov_method_is_used_by_certify_auto():
    torch.manual_seed(0)
    A = _with_norm(top=0.7)
    model = _LyaModel(MLPInjection(64, 6), LinearCell(A), LinearHead(6, 3), solver=TIGHT,
                      input_shape=(1, 8, 8))
    rep = certify(model, _inputs(4).float())
    assert "lyapunov" in rep.settings["methods"]
    assert rep.global_certificates["lyapunov"]["candidate"] == "_LyaModel.lyapunov"
    assert all(r.details["stability"]["lyapunov"] and r.details["lyapunov"]["margin"] > 0 for r in rep.results)
    assert rep.summary["lyapunov_fraction"] == 1.0


def test_lyapunov_rejects_bad_options():
    model = linear_deq(_with_norm(), num_classes=3)
    x = _inputs(2).float()
    with pytest.raises(ConfigError):
        lyapunov_decrease(model, x, "cubic")
    with pytest.raises(ConfigError):
        lyapunov_decrease(model, x, steps=0)
    with pytest.raises(ConfigError):
        lyapunov_decrease(model, x, perturb="big")
    with pytest.raises(ConfigError):
        lyapunov_decrease(model, x, dynamics="ode")


# ------------------------------------------------------------------------------------- IBP
def _ibp_model(kind):
    torch.manual_seed(2)
    if kind == "monotone":
        return zoo.build("mon_deq", hidden=12, m=2.0, std=0.5).double().eval()
    m = zoo.build("mlp_deq", hidden=12, act=kind, std=0.5).double().eval()
    with torch.no_grad():
        W = m.cell.W.linear.weight
        W.mul_(0.5 / float(W.abs().sum(1).max()))      # ||W||_inf = 0.5: a useful interval map
    return m


@pytest.mark.parametrize("kind", ["tanh", "relu", "monotone"])
def test_ibp_box_contains_fixed_points_of_sampled_inputs(kind):
    model = _ibp_model(kind)
    x = _inputs(4, seed=21)
    eps = 0.01
    with torch.no_grad():
        pred = model.readout(model.solve(model.inject(x), solver=TIGHT).z).argmax(1)
    r = ibp_certify(model, x, pred, eps)
    assert r.applicable, r.reason
    assert float((r.z_hi - r.z_lo).mean()) < 0.5            # far inside the starting box
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        delta = eps * (2 * torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) - 1)
        delta[:, :, :2] = eps * torch.sign(delta[:, :, :2])   # some coordinates at the corners
        xp = (x + delta).clamp(0, 1)
        with torch.no_grad():
            zp = model.solve(model.inject(xp), solver=TIGHT).z
        assert bool((zp >= r.z_lo - 1e-9).all() and (zp <= r.z_hi + 1e-9).all())
        # certified samples: logits bounds imply the prediction at every sampled point
        with torch.no_grad():
            pred_p = model.readout(zp).argmax(1)
        assert bool((pred_p[r.certified] == pred[r.certified]).all())
    assert r.certified.dtype == torch.bool
    # the margins against their closed form on the box: the linear head's lowest logit_y - logit_j
    # over [z_lo, z_hi] is c.mid - |c|.rad + b_y - b_j (c = w_y - w_j); certified iff it is > 0
    W, b = model.head.linear.weight.detach(), model.head.linear.bias.detach()
    mid, rad = (r.z_hi + r.z_lo) / 2, (r.z_hi - r.z_lo) / 2
    c = W[pred][:, None, :] - W[None, :, :]                    # (B, classes, D)
    low = (c * mid[:, None]).sum(-1) - (c.abs() * rad[:, None]).sum(-1) + (b[pred][:, None] - b[None])
    low[torch.arange(4), pred] = float("inf")
    exact = low.min(1).values
    assert bool((r.lower_margin <= exact + 1e-12).all())      # outward rounding: never above
    torch.testing.assert_close(r.lower_margin, exact, rtol=0, atol=1e-9)
    assert torch.equal(r.certified, exact > 0)


def test_ibp_not_applicable_for_conv_cell():
    model = zoo.build("conv_deq", in_shape=(1, 4, 4), channels=4, groups=2).double()
    r = ibp_certify(model, _inputs(2)[:, :, :4, :4], torch.zeros(2, dtype=torch.long), 0.01)
    assert not r.applicable and "not supported" in r.reason


# ------------------------------------------------------------------------ report & options
def test_report_json_round_trip_markdown_and_save(tmp_path):
    torch.manual_seed(0)
    model = zoo.build("mon_deq", hidden=8)   # its method name contains "||U||": cells must be escaped
    x = _inputs(5).float()
    y = torch.tensor([0, 1, 2, 3, 4])
    rep = certify(model, x, y, eps_l2=(0.1, 0.5), eps_linf=(0.01,))
    assert len(rep.results) == 5
    d = json.loads(rep.to_json())
    assert d["schema"] == "robustdeq.certify/1"
    back = CertReport.from_json(rep.to_json())
    assert back.to_dict() == rep.to_dict()
    r0 = rep.results[0]
    assert CertResult.from_dict(json.loads(json.dumps(r0.to_dict()))).to_dict() == r0.to_dict()
    # non-finite floats survive as strict JSON
    odd = CertResult(True, None, math.inf, "m", {"a": -math.inf, "b": [math.nan]})
    text = json.dumps(odd.to_dict(), allow_nan=False)
    back_odd = CertResult.from_dict(json.loads(text))
    assert back_odd.radius == math.inf and back_odd.details["a"] == -math.inf and math.isnan(back_odd.details["b"][0])
    paths = rep.save(tmp_path / "cert")
    assert CertReport.load(paths["json"]).to_dict() == rep.to_dict()
    assert CertReport.load(tmp_path / "cert").summary == rep.summary
    md = open(paths["markdown"]).read()
    assert "# Certificate report: mon_deq" in md and "Contraction" in md and "cert acc L2@0.1" in md
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line.replace("\\|", "").count("|"))
        elif cur:
            tables.append(cur)
            cur = []
    assert len(tables) == 2 and all(len(set(t)) == 1 for t in tables)   # well-formed tables
    brief = rep.brief()
    assert "contraction: certified" in brief and "mean certified L2 radius" in brief
    with pytest.raises(ConfigError):
        CertReport.from_dict({**d, "schema": "other/9"})
    with pytest.raises(ConfigError):
        CertResult.from_dict({**r0.to_dict(), "extra": 1})


def test_certify_validates_options_and_inputs():
    model = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.5)
    x = _inputs(2).float()
    with pytest.raises(ConfigError, match="unknown certification method"):
        certify(model, x, methods=["contraction", "magic"])
    with pytest.raises(ConfigError, match="methods is empty"):  # it reported 0 % certified at every radius
        certify(model, x, methods=[])
    with pytest.raises(ConfigError):
        certify(model, x, eps_l2=(-0.1,))
    with pytest.raises(ConfigError, match="eps_linf"):
        certify(model, x, methods=["ibp"])
    with pytest.raises(ConfigError):
        certify(model, x, batch_size=0)
    with pytest.raises(InputError):
        certify(model, x, torch.tensor([1, 2, 3]))
    with pytest.raises(InputError):
        certify(model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError):
        certify(model, x, torch.tensor([0, 12]))
    with pytest.raises(InputError):
        certify(model, x * 3)
    with pytest.raises(ConfigError, match="DEQ"):
        certify(zoo.build("ff_mlp", hidden=8), x)
    with pytest.raises(ConfigError, match="lyapunov_dynamics"):
        certify(model, x, lyapunov_dynamics="ode")
    # a solve that cannot reach the tolerance: no local stability claim, and a warning says so;
    # nor is its iterate the point the model's own solve reaches, and a second warning says so
    with pytest.warns(CertificationWarning) as caught:
        rep = certify(model, x, solver={"name": "fixed_point", "max_iter": 1}, methods=["local"])
    said = [str(w.message) for w in caught]
    assert any("did not reach" in m for m in said), said
    assert any("model's own solve does not reach the certified fixed point" in m for m in said), said
    assert not any(r.details["stability"]["local"] for r in rep.results)
    assert all(r.stable for r in rep.results)  # the global contraction still holds


def test_certify_leaves_the_model_untouched_and_reports_without_labels():
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.5)
    model.train()
    model.head.eval()  # mixed modes must be restored exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rep = certify(model, _inputs(3).float())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    assert next(model.parameters()).dtype == torch.float32
    assert "certified_fraction_l2" in rep.summary and rep.summary["clean_accuracy"] is None
    assert all(r.details["label"] is None and r.stable for r in rep.results)


def test_lyadeq_uses_its_lyapunov_and_its_separation_head_is_affine():
    pytest.importorskip("robustdeq.defenses.lyapunov")
    torch.manual_seed(0)
    model = zoo.build("lyadeq", hidden=8, icnn_hidden=(8, 8), solver=TIGHT)   # untrained: ||W|| = 0.5
    x = _inputs(3).float()
    rep = certify(model, x, perturb=0.3, lyapunov_dynamics="stable_map", lyapunov_steps=10)
    assert rep.global_certificates["lyapunov"]["candidate"] == "LyaDEQ.lyapunov"
    assert rep.global_certificates["contraction"]["certified"]
    lp = rep.global_certificates["lipschitz"]
    assert lp["available"]
    # classifier(Q z) with Q orthogonal: Lip(x -> logits) bound dominates the exact Jacobian
    m64 = model.double().eval()
    with gradient(m64, ImplicitGrad(solver=TIGHT)):
        J = torch.autograd.functional.jacobian(lambda t: m64(t.view(1, 1, 8, 8)).squeeze(0),
                                               _inputs(1).flatten())
    assert float(torch.linalg.matrix_norm(J, 2)) <= lp["lip_logits"]
    assert all("lyapunov" in r.details for r in rep.results)


def test_certificate_states_the_models_solver_guarantee():
    torch.manual_seed(0)
    fp = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.5,
                   solver={"name": "fixed_point", "damping": 0.5, "max_iter": 40})
    cert = contraction_certificate(fp)
    L = cert.lip_z
    assert "guaranteed to converge" in cert.details["model_solver"]
    assert f"{1 - 0.5 * (1 - L):.6g}" in cert.details["model_solver"]
    # and the claimed rate holds: damped iteration error shrinks at least by q per step
    q = 1 - 0.5 * (1 - L)
    fp.double().eval()   # a fixed map (in train mode each weight access runs a power iteration)
    with torch.no_grad():
        u = fp.inject(_inputs(2))
        z_ref = fp.solve(u, solver=TIGHT).z
        z = torch.zeros_like(z_ref)
        e0 = (z - z_ref).norm(dim=1)
        for k in range(1, 41):
            z = 0.5 * z + 0.5 * fp.f(z, u)
            assert bool(((z - z_ref).norm(dim=1) <= q ** k * e0 * (1 + 1e-9) + 1e-12).all())
    anderson = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.5)
    assert "not guaranteed" in contraction_certificate(anderson).details["model_solver"]
    expansive = contraction_certificate(_expansive())
    assert "no guarantee" in expansive.details["model_solver"]


@pytest.mark.gpu
def test_certify_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = zoo.build("mon_deq", hidden=16)
    x = _inputs(6).float()
    y = torch.arange(6)
    cpu = certify(model, x, y, eps_linf=(0.01,))
    gpu = certify(model.cuda(), x.cuda(), y.cuda(), eps_linf=(0.01,))
    for a, b in zip(cpu.results, gpu.results):
        assert a.stable == b.stable and a.radius == pytest.approx(b.radius, rel=1e-6, abs=1e-9)


def test_certify_checkpoint_round_trip(tmp_path):
    from robustdeq.certify import certify_checkpoint
    from robustdeq.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.5)
    save_checkpoint(tmp_path / "m.pt", model, model_config=model.robustdeq_config)
    rep = certify_checkpoint(tmp_path / "m.pt", n_inputs=6, out_dir=tmp_path / "out", eps_l2=(0.1,))
    assert len(rep.results) == 6 and rep.provenance["checkpoint"].endswith("m.pt")
    assert CertReport.load(tmp_path / "out").summary == rep.summary
    from robustdeq.data import load_digits
    x, y = load_digits("test")
    direct = certify(model, x[:6], y[:6], eps_l2=(0.1,))
    assert [r.radius for r in direct.results] == pytest.approx([r.radius for r in rep.results], rel=1e-9)
    with pytest.raises(ConfigError, match="n_inputs"):
        certify_checkpoint(tmp_path / "m.pt", n_inputs=0)
    with pytest.raises(ConfigError, match="deterministic, smoothing"):
        certify_checkpoint(tmp_path / "m.pt", "magic")
    with pytest.raises(ConfigError, match="unknown option"):  # checked before the file is read
        certify_checkpoint(tmp_path / "nosuch.pt", eps_l1=0.1)
