"""``certify(model, x, y)``: every certificate that applies to a DEQ, per sample, in one report."""
from __future__ import annotations

import datetime
import logging
import math
import time
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import CertificationWarning, ConfigError, InputError, NonConvergenceWarning
from ..guard import preserve_model
from .._support import user_stacklevel
from ._util import float64_copy, require_deq, tight_solver
from .contraction import contraction_certificate
from .ibp import ibp_certify
from .lipschitz import certified_radius, lipschitz_bound
from .local import local_stability
from .lyapunov import lyapunov_decrease, model_candidate, quadratic_candidate
from .report import CertReport, CertResult, _eps_key, summarize

logger = logging.getLogger(__name__)

METHODS = ("contraction", "local", "lyapunov", "lipschitz", "ibp")

NOTES = [
    "Contraction and Lipschitz bounds are sound upper bounds (exact SVD in float64 with a relative "
    "slack of 1e-9, or Gram-matrix squaring); power iteration is never used as an upper bound.",
    "Certified L2 radii are for the exact equilibrium map defined by the weights: the margin at the "
    "solver's state is lowered by (bound on Lip of the pair) x (a-posteriori error bound "
    "||z - z*|| <= ||f(z) - z|| / (1 - L)) before dividing. The deployed model's own solver "
    "tolerance and float32 rounding are outside the bound (see each sample's residual).",
    "Local stability: with the dense method ||J||_2 and rho(J) come from the exact per-sample "
    "Jacobian (SVD / eigenvalues); with the power method ||J||_2 is an estimate from below and "
    "rho(J) a growth-rate estimate, neither is a bound.",
    "Lyapunov decrease is checked on the recorded steps of the trajectories only (empirical).",
    "IBP boxes enclose z*(x') for every x' in the Linf ball intersected with [0, 1] (sound by "
    "induction from an a-priori box; see robustdeq.certify.ibp).",
]


def _check_eps(name: str, eps) -> tuple:
    if eps is None:
        return ()
    if isinstance(eps, (int, float)):
        eps = (eps,)
    out = []
    for e in eps:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise ConfigError(f"{name} values must be finite numbers >= 0, got {e!r}")
        out.append(float(e))
    return tuple(out)


def _resolve_methods(methods, model, V, eps_linf) -> tuple:
    if methods == "auto":
        chosen = ["contraction", "local", "lipschitz"]
        if eps_linf:
            chosen.append("ibp")
        if V is not None or model_candidate(model) is not None:
            chosen.append("lyapunov")
        return tuple(chosen)
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown certification method(s) {unknown}; expected 'auto' or a subset of "
                          f"{', '.join(METHODS)}")
    if "ibp" in methods and not eps_linf:
        raise ConfigError("method 'ibp' needs eps_linf (Linf radii to certify)")
    return tuple(dict.fromkeys(["contraction"] + methods))  # the global certificate is always computed


def _model_info(model: nn.Module) -> dict:
    cfg = getattr(model, "robustdeq_config", None) or {}
    sc = getattr(model, "solver_config", None)
    from ..config import to_dict
    return {"name": cfg.get("name"), "options": cfg.get("options"), "class": type(model).__name__,
            "cell": type(getattr(model, "cell", None)).__name__,
            "solver": to_dict(sc) if sc is not None else None}


def certify(model: nn.Module, x: Tensor, y: Optional[Tensor] = None, *,
            eps_l2: Union[float, Sequence[float]] = (0.1, 0.25, 0.5),
            eps_linf: Union[float, Sequence[float], None] = (),
            methods: Union[str, Iterable[str]] = "auto",
            V: Optional[Callable] = None, lyapunov_steps: int = 30, perturb=None,
            lyapunov_dynamics: str = "iteration",
            local_method: str = "auto", local_iters: int = 100, dense_max: int = 256,
            ibp_iters: int = 200, solver=None, fp_tol: float = 1e-6, spectral: str = "auto",
            batch_size: int = 256, seed: int = 0, progress: bool = False,
            deploy_tol: float = 1e-2) -> CertReport:
    """Certify a DEQ on inputs ``x`` (labels ``y`` optional) with every applicable method.

    Args:
        model: a DEQ (``DEQClassifier`` interface). It is not modified: certificates are computed on
            an eval-mode float64 copy that iterates the same map.
        x: (N, ...) inputs in [0, 1]; y: (N,) int labels or None (predictions are used instead and
            the report gives certified fractions rather than accuracies).
        eps_l2: L2 radii for certified accuracy. eps_linf: Linf radii checked by IBP.
        methods: ``"auto"`` (contraction, local, lipschitz; ibp when ``eps_linf``; lyapunov when the
            model has a ``lyapunov`` method or ``V`` is given) or a subset of :data:`METHODS`.
        V: Lyapunov candidate ``(z, z_ref) -> (B,)``; perturb, lyapunov_dynamics: start and
            dynamics of the Lyapunov trajectories (see :func:`lyapunov_decrease`).
        local_method: ``"auto"``/``"dense"``/``"power"`` (see :mod:`.local`).
        solver: solver config for the certification solves (default: the model's solver with
            absolute tol 1e-10 and >= 500 iterations). fp_tol: residual up to which a state counts
            as a fixed point for local stability.
        spectral: spectral-norm method for the global bounds (``"auto"``, ``"svd"``, ``"gram"``).
        deploy_tol: the certificates hold for the exact fixed point ``z*`` (a tight float64
            solve); the model deployed computes ``z`` with its own solver, budget, tolerance and
            dtype. That solve is run on every sample, and a sample whose deployed state is
            farther than ``deploy_tol`` (relative L2) from ``z*``, or whose deployed prediction
            differs, gets no robustness certificate (radius 0, no eps certified), with its reason
            in ``details["deployed"]`` and a ``CertificationWarning``. The deployed solve is
            checked at the clean input only.
    Returns:
        :class:`CertReport` with one :class:`CertResult` per sample.

    Inside a process group (``torchrun``; :mod:`robustdeq.distributed`) the batches are shared
    out over the ranks (batch ``j`` on rank ``j % world_size``, the batches of one process) and
    every rank returns the whole report; ``certify_checkpoint`` writes it on rank 0 only.
    """
    require_deq(model, "certify")
    eps_l2 = _check_eps("eps_l2", eps_l2)
    eps_linf = _check_eps("eps_linf", eps_linf)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if V is not None and not (callable(V) or V == "quadratic"):
        raise ConfigError("V must be a callable (z, z_ref) -> (B,) or 'quadratic'")
    if lyapunov_dynamics not in ("iteration", "solver", "stable_map"):
        raise ConfigError(f"unknown lyapunov_dynamics {lyapunov_dynamics!r}; expected 'iteration', "
                          "'solver' or 'stable_map'")
    if not (isinstance(deploy_tol, (int, float)) and not isinstance(deploy_tol, bool) and deploy_tol >= 0):
        raise ConfigError(f"deploy_tol must be a number >= 0, got {deploy_tol!r}")
    methods = _resolve_methods(methods, model, V, eps_linf)
    with preserve_model(model, "eval", who="certify"):
        return _certify(model, x, y, eps_l2=eps_l2, eps_linf=eps_linf, methods=methods, V=V,
                        lyapunov_steps=lyapunov_steps, perturb=perturb,
                        lyapunov_dynamics=lyapunov_dynamics, local_method=local_method,
                        local_iters=local_iters, dense_max=dense_max, ibp_iters=ibp_iters,
                        solver=solver, fp_tol=fp_tol, spectral=spectral, batch_size=batch_size,
                        seed=seed, progress=progress, deploy_tol=float(deploy_tol))


def _deployed(model: nn.Module, xb: Tensor, z_star: Tensor, pred: Tensor, deploy_tol: float) -> dict:
    """Run the deployed computation (the model's own solver, budget, tolerance and dtype) and
    compare it with the certified fixed point ``z_star`` (float64)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)  # reported per sample below
        eq = model.run(xb)
    zd = eq.z_star.detach().to(torch.float64).flatten(1)
    zs = z_star.flatten(1)
    gap = (zd - zs).norm(dim=1) / (zs.norm(dim=1) + 1e-12)
    dpred = eq.logits.detach().argmax(dim=1).to(pred.device)
    return {"gap": gap, "pred": dpred, "ok": (gap <= deploy_tol) & (dpred == pred),
            "residual": eq.stats.residual.detach().double(), "converged": eq.stats.converged,
            "steps": eq.stats.steps}


def _certify(model, x, y, *, eps_l2, eps_linf, methods, V, lyapunov_steps, perturb, lyapunov_dynamics,
             local_method, local_iters, dense_max, ibp_iters, solver, fp_tol, spectral, batch_size,
             seed, progress, deploy_tol) -> CertReport:
    x = model.check_input(x)
    n = x.shape[0]
    if y is not None:
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != n:
            raise InputError(f"y must be a 1-D tensor of {n} labels, got "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise InputError(f"y must hold integer class labels, got dtype {y.dtype}")

    timing = {m: 0.0 for m in methods}
    timing["solve"] = 0.0
    t_all = time.perf_counter()
    work = float64_copy(model)
    t = time.perf_counter()
    cert = contraction_certificate(work, spectral=spectral)
    timing["contraction"] += time.perf_counter() - t
    glob = {"contraction": cert.to_dict()}
    bound = None
    if "lipschitz" in methods:
        t = time.perf_counter()
        bound = lipschitz_bound(work, cert, spectral=spectral)
        timing["lipschitz"] += time.perf_counter() - t
        glob["lipschitz"] = bound.to_dict()
        if not bound.available:
            logger.info("no certified radius: %s", bound.reason)
    cfg = tight_solver(work) if solver is None else solver
    if "lyapunov" in methods:
        V_used = V if callable(V) else (model_candidate(work) if V is None else None) or quadratic_candidate()
        glob["lyapunov"] = {"candidate": getattr(V_used, "__name__", type(V_used).__name__),
                            "steps": lyapunov_steps, "dynamics": lyapunov_dynamics, "perturb": None if perturb is None else
                            (perturb if isinstance(perturb, (int, float)) else type(perturb).__name__)}

    results = []
    from ..distributed import context as _dist_context
    dist_ctx = _dist_context()
    it = range(0, n, batch_size)
    if dist_ctx is not None:  # batch j on rank j % world (the same batches as one process)
        it = it[dist_ctx.rank::dist_ctx.world_size]
    if progress and (dist_ctx is None or dist_ctx.is_main):
        from tqdm.auto import tqdm
        it = tqdm(it, desc="certify", unit="batch")
    n_unconverged = 0
    n_refused = 0
    ibp_reason = None
    for s in it:
        xb = x[s:s + batch_size].detach().to(torch.float64)
        t = time.perf_counter()
        with torch.no_grad():
            u = work.inject(xb)
            z = work.solve(u, solver=cfg).z
            residual = (work.f(z, u) - z).flatten(1).norm(dim=1)
            logits = work.readout(z)
        timing["solve"] += time.perf_counter() - t
        pred = logits.argmax(dim=1)
        yb = y[s:s + batch_size].to(pred.device) if y is not None else None
        if yb is not None and (int(yb.min()) < 0 or int(yb.max()) >= logits.shape[1]):
            raise InputError(f"labels must be in [0, {logits.shape[1] - 1}], got "
                             f"[{int(yb.min())}, {int(yb.max())}]")
        lab = yb if yb is not None else pred
        n_unconverged += int((residual > fp_tol).sum())
        dep = _deployed(model, x[s:s + batch_size], z, pred, deploy_tol)
        n_refused += int((~dep["ok"]).sum())
        rad = None
        if bound is not None and bound.available:
            t = time.perf_counter()
            rad = certified_radius(bound, logits, lab, residual)
            timing["lipschitz"] += time.perf_counter() - t
        loc = None
        if "local" in methods:
            t = time.perf_counter()
            loc = local_stability(work, u=u, z=z, tol=fp_tol, method=local_method, iters=local_iters,
                                  dense_max=dense_max, seed=seed)
            timing["local"] += time.perf_counter() - t
            glob.setdefault("local", {"method": loc.method, "exact": loc.exact, "note": loc.describe(),
                                      "fp_tol": fp_tol})
        lya = None
        if "lyapunov" in methods:
            t = time.perf_counter()
            lya = lyapunov_decrease(work, xb, V_used, steps=lyapunov_steps, perturb=perturb, z_ref=z,
                                    dynamics=lyapunov_dynamics, seed=seed + s)
            timing["lyapunov"] += time.perf_counter() - t
        ibps = {}
        if "ibp" in methods:
            t = time.perf_counter()
            for e in eps_linf:
                r = ibp_certify(work, xb, lab, e, iters=ibp_iters, contraction=cert,
                                lipschitz=bound, z=z, residual=residual)
                xf = xb.flatten(1)
                dx = torch.maximum(xf - (xf - e).clamp(0, 1), (xf + e).clamp(0, 1) - xf).norm(dim=1)
                ibps[_eps_key(e)] = (r, dx)
                if not r.applicable:
                    ibp_reason = r.reason
            timing["ibp"] += time.perf_counter() - t
        for b in range(xb.shape[0]):
            stab = {"contraction": bool(cert.certified)}
            basis = ["global contraction"] if cert.certified else []
            d = {"index": s + b, "label": int(yb[b]) if yb is not None else None, "pred": int(pred[b]),
                 "correct": bool(pred[b] == yb[b]) if yb is not None else None,
                 "residual": float(residual[b]), "converged": bool(residual[b] <= fp_tol)}
            if loc is not None:
                stab["local"] = bool(loc.stable[b])
                stab["local_contractive"] = bool(loc.contractive[b])
                d["local"] = {"rho": float(loc.rho[b]), "sigma": float(loc.sigma[b]), "exact": loc.exact,
                              "method": loc.method}
                if loc.stable[b]:
                    basis.append("local rho(J) < 1" + (" (exact)" if loc.exact else " (estimate)"))
            if lya is not None:
                stab["lyapunov"] = bool(lya.stable[b])
                d["lyapunov"] = {"margin": float(lya.margin[b]), "ratio": float(lya.ratio[b]),
                                 "candidate": lya.candidate, "start": lya.start}
                if lya.stable[b]:
                    basis.append("Lyapunov decrease")
            d["stability"] = stab
            d["stability_basis"] = basis
            reached = bool(dep["ok"][b])
            d["deployed"] = {"reaches_certified_fixed_point": reached, "gap": float(dep["gap"][b]),
                             "pred": int(dep["pred"][b]), "residual": float(dep["residual"][b]),
                             "converged": bool(dep["converged"][b]), "steps": int(dep["steps"][b])}
            if not reached:
                d["deployed"]["reason"] = (
                    f"the model's own solve ends {float(dep['gap'][b]):.2g} (relative) from the certified "
                    f"fixed point" + ("" if int(dep["pred"][b]) == int(pred[b]) else
                                      f" and predicts {int(dep['pred'][b])}, not {int(pred[b])}")
                    + ": no robustness certificate for the deployed computation")
            radius = 0.0
            if rad is not None:
                radius = float(rad.radius[b])
                if (yb is not None and not d["correct"]) or not reached:
                    radius = 0.0
                d.update({"margin": float(rad.margin[b]), "margin_lower": float(rad.margin_lower[b]),
                          "radius_global": float(rad.radius_global[b]) if d["correct"] is not False else 0.0,
                          "runner_up": int(rad.runner_up[b])})
                d["l2_certified"] = {_eps_key(e): radius > e for e in eps_l2}
            if ibps:
                d["linf"] = {}
                for k, (r, dx) in ibps.items():
                    # the Linf ball (within [0, 1]) lies in the L2 ball of radius ||dx||
                    via_l2 = radius > float(dx[b])
                    via_ibp = bool(r.certified[b]) if r.applicable else False
                    entry = {"certified": (via_l2 or via_ibp) and d["correct"] is not False and reached,
                             "ibp": via_ibp, "via_l2_radius": via_l2}
                    if r.applicable:
                        entry["lower_margin"] = float(r.lower_margin[b])
                    else:
                        entry["reason"] = r.reason
                    d["linf"][k] = entry
            method = " + ".join(basis) if basis else "no stability certificate"
            method += f"; L2 radius: {bound.method}, per-pair" if rad is not None else "; no L2 radius"
            if ibps:
                method += "; Linf: IBP or L2 radius"
            if not reached:
                method += "; refused: the deployed solve does not reach the certified fixed point"
            results.append(CertResult(stable=bool(basis), bound=bound.lip_logits if rad is not None else None,
                                      radius=radius, method=method, details=d))
    if dist_ctx is not None:
        results, n_unconverged, n_refused, ibp_reason, local = _gather_shards(
            results, n_unconverged, n_refused, ibp_reason, glob.get("local"))
        if local is not None:
            glob["local"] = local
    if "ibp" in methods:
        glob["ibp"] = ("not applicable: " + ibp_reason) if ibp_reason else \
            "interval iteration through the fixed point from an a-priori box"
    if n_unconverged:
        msg = (f"certify: {n_unconverged}/{n} samples did not reach a residual of {fp_tol:g} in the "
               f"certification solve: no local stability for them")
        warnings.warn(msg, CertificationWarning, stacklevel=user_stacklevel())
    glob["computation"] = {
        "certified": "the exact fixed point z*(x) of the model's map (float64 solve, residual per sample)",
        "deployed": {"solver": _solver_dict(model.solver_config) if hasattr(model, "solver_config") else None,
                     "dtype": str(next(iter(model.parameters())).dtype) if any(True for _ in model.parameters()) else None,
                     "deploy_tol": deploy_tol, "refused": n_refused,
                     "rule": "a sample is certified only if the model's own solve (its solver, budget, "
                             "tolerance, dtype) ends within deploy_tol (relative L2) of z* with the same "
                             "prediction; checked at the clean input"}}
    if n_refused:
        warnings.warn(f"certify: on {n_refused}/{n} samples the model's own solve does not reach the certified "
                      f"fixed point (relative gap > {deploy_tol:g} or another prediction): no robustness "
                      "certificate for them", CertificationWarning, stacklevel=user_stacklevel())
    total = time.perf_counter() - t_all
    timing = {k: v for k, v in timing.items()}
    timing["total_s"] = total
    timing["per_sample_s"] = total / max(n, 1)
    from .. import __version__
    settings = {"eps_l2": list(eps_l2), "eps_linf": list(eps_linf), "methods": list(methods),
                "local_method": local_method, "local_iters": local_iters, "dense_max": dense_max,
                "lyapunov_steps": lyapunov_steps, "lyapunov_dynamics": lyapunov_dynamics, "ibp_iters": ibp_iters, "fp_tol": fp_tol,
                "spectral": spectral, "solver": _solver_dict(cfg), "dtype": "float64", "seed": seed,
                "deploy_tol": deploy_tol,
                "notes": NOTES}
    prov = {"robustdeq": __version__, "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    summary = summarize(results, eps_l2, eps_linf)
    return CertReport(model=_model_info(model), settings=settings, global_certificates=glob,
                      results=results, summary=summary, timing=timing, provenance=prov)


def certify_checkpoint(path, *, dataset: str = "digits", split: str = "test", root=None,
                       n: Optional[int] = None, out_dir=None, map_location="cpu", **options) -> CertReport:
    """Load a checkpoint, certify it on ``n`` samples of a dataset split, optionally save the
    report (``certificate.json`` / ``.md`` in ``out_dir``). ``options`` go to :func:`certify`.
    The body of ``robustdeq certify CHECKPOINT``."""
    from ..checkpoint import load_model
    from ..data import load_dataset
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be a positive int, got {n!r}")
    model, ckpt = load_model(path, map_location=map_location)
    x, y = load_dataset(dataset, split, root=root)
    if n is not None:
        x, y = x[:n], y[:n]
    rep = certify(model, x.to(map_location), y.to(map_location), **options)
    rep.provenance.update({"checkpoint": str(path), "dataset": dataset, "split": split})
    from ..distributed import is_main
    if out_dir is not None and is_main():  # in a process group rank 0 writes
        rep.save(out_dir)
    return rep


def _gather_shards(results, n_unconverged, n_refused, ibp_reason, local):
    """Every rank's per-sample results (in sample order) and counts, on every rank."""
    from ..distributed import all_gather_object
    parts = all_gather_object((results, n_unconverged, n_refused, ibp_reason, local))
    merged = sorted((r for p in parts for r in p[0]), key=lambda r: r.details["index"])
    reason = next((p[3] for p in parts if p[3]), None)
    loc = next((p[4] for p in parts if p[4] is not None), None)
    return merged, sum(p[1] for p in parts), sum(p[2] for p in parts), reason, loc


def _solver_dict(cfg) -> dict:
    from ..config import SolverConfig, from_dict, to_dict
    return to_dict(from_dict(SolverConfig, cfg))


__all__ = ["certify", "certify_checkpoint", "METHODS"]
