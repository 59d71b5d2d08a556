"""``certify(model, x, y)``: every certificate that applies to a DEQ, per sample, in one report."""
from __future__ import annotations

import datetime
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import CertificationWarning, ConfigError, InputError, NonConvergenceWarning
from ..guard import preserve_model
from .._support import user_stacklevel
from .._tensor import check_labels
from ._util import (FEEDFORWARD_KINDS, check_forward_hooks, float64_copy, is_feedforward, meant_as_feedforward,
                    require_deq, require_feedforward, tight_solver)
from .config import METHODS, CertifyConfig, make_certify_config
from ..deq.contraction import contraction_certificate
from .ibp import ibp_certify, ibp_unavailable
from .lipschitz import certified_radius, lipschitz_bound
from .local import local_stability
from .lyapunov import lyapunov_decrease, model_candidate, quadratic_candidate
from .report import CertReport, CertResult, _eps_key, summarize
from .resume import BatchResults

logger = logging.getLogger(__name__)


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


def certify(model: nn.Module, x: Tensor, y: Optional[Tensor] = None,
            config: Union[CertifyConfig, Mapping[str, Any], None] = None, *, partial=None,
            **options: Any) -> CertReport:
    """Certify a DEQ on inputs ``x`` (labels ``y`` optional) with every applicable method (a
    feed-forward network: Linf certificates by IBP through its layers,
    :func:`robustdeq.certify.feedforward.certify_feedforward`).

    Args:
        model: a DEQ (``DEQClassifier`` interface). It is not modified: certificates are computed on
            an eval-mode float64 copy that iterates the same map.
        x: (N, ...) inputs in [0, 1]; y: (N,) int labels or None (predictions are used instead and
            the report gives certified fractions rather than accuracies).
        config: a :class:`~robustdeq.certify.config.CertifyConfig` (or a mapping of its options);
            ``options`` (the same names as keywords) build it or override its fields; an unknown
            option is a :class:`ConfigError`. The options:

    Options:
        eps_l2: L2 radii for certified accuracy. eps_linf: Linf radii checked by IBP.
        methods: ``"auto"`` (contraction, local, lipschitz; ibp when ``eps_linf``; lyapunov when the
            model has a ``lyapunov`` method or ``V`` is given) or a subset of :data:`METHODS`.
        V: Lyapunov candidate ``(z, z_ref) -> (B,)``; perturb, lyapunov_dynamics, lyapunov_steps:
            start, dynamics and length of the Lyapunov trajectories (see :func:`lyapunov_decrease`).
        local_method: ``"auto"``/``"dense"``/``"power"`` (see :mod:`.local`); local_iters,
            dense_max: its budget. ibp_iters: interval iterations.
        solver: solver config for the certification solves (default: the model's solver with
            absolute tol 1e-10 and >= 500 iterations). fp_tol: residual up to which a state counts
            as a fixed point for local stability.
        spectral: spectral-norm method for the global bounds (``"auto"``, ``"svd"``, ``"gram"``).
        batch_size, seed, progress: batches, the seed of the randomized estimates, a tqdm bar.
        deploy_tol: the certificates hold for the exact fixed point ``z*`` (a tight float64
            solve); the model deployed computes ``z`` with its own solver, budget, tolerance and
            dtype. That solve is run on every sample, and a sample whose deployed state is
            farther than ``deploy_tol`` (relative L2) from ``z*``, or whose deployed prediction
            differs, gets no robustness certificate (radius 0, no eps certified), with its reason
            in ``details["deployed"]`` and a ``CertificationWarning``. The deployed solve is
            checked at the clean input only.

    ``partial``: a :class:`~robustdeq.certify.resume.PartialResults` of
    :class:`~robustdeq.certify.resume.BatchResults` (:func:`~robustdeq.certify.resume.certify_partial`;
    in a process group, this rank's): the batches it holds are taken from it and each batch
    computed is added to it as soon as it is done, so a killed run resumes with the results of an
    uninterrupted one.

    Returns:
        :class:`CertReport` with one :class:`CertResult` per sample.

    Inside a process group (``torchrun``; :mod:`robustdeq.distributed`) the batches are shared
    out over the ranks (batch ``j`` on rank ``j % world_size``, the batches of one process) and
    every rank returns the whole report; ``certify_checkpoint`` writes it on rank 0 only. An
    exception on one rank is raised on every rank.
    """
    from .feedforward import certify_feedforward
    if is_feedforward(model):  # the explicit baseline: IBP through the layers
        return certify_feedforward(model, x, y, config, partial=partial, **options)
    if meant_as_feedforward(model):
        require_feedforward(model, "certify")  # not one certify() takes: says why, and what to pass
    try:
        require_deq(model, "certify")
    except ConfigError as err:
        raise ConfigError(f"{err}; feed-forward networks ({FEEDFORWARD_KINDS}) are certified by IBP "
                          "through their layers") from None
    cfg = make_certify_config(config, **options)
    methods = _resolve_methods(cfg.methods, model, cfg.V, cfg.eps_linf)
    with preserve_model(model, "eval", who="certify"):
        return _certify(model, x, y, cfg, methods, partial)


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


@dataclass
class _Certification:
    """The state of one :func:`certify` call, handed to its steps."""

    model: nn.Module
    work: nn.Module                      # the float64 eval-mode copy
    cfg: CertifyConfig
    methods: tuple
    x: Tensor
    y: Optional[Tensor]
    solver: Any = None                   # the certification solves' config
    cert: Any = None                     # the global contraction certificate
    bound: Any = None                    # the Lipschitz bound (or None)
    V_used: Any = None
    glob: Dict[str, Any] = field(default_factory=dict)
    timing: Dict[str, float] = field(default_factory=dict)
    results: List[CertResult] = field(default_factory=list)
    n_unconverged: int = 0
    n_refused: int = 0
    ibp_reason: Optional[str] = None

    def clock(self, key: str, t0: float) -> None:
        self.timing[key] += time.perf_counter() - t0


@dataclass
class _Batch:
    """One batch's certification solve and per-method results."""

    s: int
    xb: Tensor
    yb: Optional[Tensor]
    z: Tensor
    u: Tensor
    residual: Tensor
    logits: Tensor
    pred: Tensor
    dep: dict = field(default_factory=dict)
    rad: Any = None
    loc: Any = None
    lya: Any = None
    ibps: Dict[str, Any] = field(default_factory=dict)
    ibp_reason: Optional[str] = None


def _certify(model, x, y, cfg: CertifyConfig, methods: tuple, partial=None) -> CertReport:
    x = model.check_input(x)
    check_labels(y, x.shape[0])
    t_all = time.perf_counter()
    c = _Certification(model=model, work=float64_copy(model), cfg=cfg, methods=methods, x=x, y=y,
                       timing={**{m: 0.0 for m in methods}, "solve": 0.0})
    _global_certificates(c)
    from ..distributed import context as _dist_context
    for batch in _run_batches(x.shape[0], cfg, _dist_context(), lambda s: _certify_batch(c, s), partial):
        _merge_batch(c, batch)
    return _report(c, t_all)


def _global_certificates(c: _Certification) -> None:
    """Contraction (always), Lipschitz bound and Lyapunov candidate: once per model."""
    cfg, work = c.cfg, c.work
    hooks = check_forward_hooks(c.model, "certify")   # warned; the bounds do not see them
    if hooks is not None:
        c.glob["hooks"] = hooks
    t = time.perf_counter()
    c.cert = contraction_certificate(work, spectral=cfg.spectral)
    c.clock("contraction", t)
    c.glob["contraction"] = c.cert.to_dict()
    if "lipschitz" in c.methods:
        t = time.perf_counter()
        c.bound = lipschitz_bound(work, c.cert, spectral=cfg.spectral)
        c.clock("lipschitz", t)
        c.glob["lipschitz"] = c.bound.to_dict()
        if not c.bound.available:
            logger.info("no certified radius: %s", c.bound.reason)
    _announce_availability(c)
    c.solver = tight_solver(work) if cfg.solver is None else cfg.solver
    if "lyapunov" in c.methods:
        V = cfg.V
        c.V_used = V if callable(V) else (model_candidate(work) if V is None else None) or quadratic_candidate()
        perturb = cfg.perturb
        c.glob["lyapunov"] = {"candidate": getattr(c.V_used, "__name__", type(c.V_used).__name__),
                              "steps": cfg.lyapunov_steps, "dynamics": cfg.lyapunov_dynamics,
                              "perturb": None if perturb is None else
                              (perturb if isinstance(perturb, (int, float)) else type(perturb).__name__)}


def _announce_availability(c: _Certification) -> None:
    """Before any per-sample work: which certificates the model can get and why not the others
    (``global_certificates["available"]`` of the report, and one CertificationWarning naming the missing
    radius certificates)."""
    avail = {"contraction": "yes" if c.cert.certified else f"no: {c.cert.reason}"}
    if "local" in c.methods:
        avail["local"] = "yes (local stability at each converged z*)"
    if "lipschitz" in c.methods:
        avail["lipschitz"] = "yes" if c.bound.available else f"no: {c.bound.reason}"
    if "ibp" in c.methods:
        why = ibp_unavailable(c.work, c.cert)
        avail["ibp"] = "yes" if why is None else f"no: {why}"
    c.glob["available"] = avail
    missing = {k: v[4:] for k, v in avail.items() if k in ("lipschitz", "ibp") and v.startswith("no")}
    if missing:
        warnings.warn(f"certify: {type(c.model).__name__} gets no certified radius from "
                      + "; ".join(f"{k} ({v})" for k, v in missing.items())
                      + f"; available: {', '.join(k for k, v in avail.items() if v.startswith('yes'))}",
                      CertificationWarning, stacklevel=user_stacklevel())


def _batch_starts(n: int, batch_size: int, progress: bool, dist_ctx):
    """The starts of the batches of ``n`` inputs this process certifies: every one in one process
    (``dist_ctx`` None), batch ``j`` on rank ``j % world_size`` in a process group (the batches of
    one process); with a tqdm bar (on rank 0 alone) when ``progress``."""
    it = range(0, n, batch_size)
    if dist_ctx is not None:
        it = it[dist_ctx.rank::dist_ctx.world_size]
    if progress and (dist_ctx is None or dist_ctx.is_main):
        from tqdm.auto import tqdm
        it = tqdm(it, desc="certify", unit="batch")
    return it


def _run_batches(n: int, cfg: CertifyConfig, dist_ctx, compute: Callable[[int], BatchResults],
                 partial=None) -> List[BatchResults]:
    """The :class:`BatchResults` of every batch of ``n`` inputs (``cfg.batch_size`` each), in
    input order, on every rank: this process's batches (:func:`_batch_starts`) are taken from
    ``partial`` where it holds them, else computed by ``compute(start)`` and added to it at once.
    In a process group (``dist_ctx``) the ranks' batches are then gathered, and an exception that
    stopped one rank's batches is raised on every rank (no rank waits for a rank that failed)."""
    mine: List[BatchResults] = []
    failure: Optional[BaseException] = None
    try:
        for s in _batch_starts(n, cfg.batch_size, cfg.progress, dist_ctx):
            batch = partial.done.get(s) if partial is not None else None
            if batch is None:
                batch = compute(s)
                if partial is not None:
                    partial.add(batch)
            mine.append(batch)
    except Exception as e:
        if dist_ctx is None:
            raise
        failure = e  # raised on every rank by gather_sharded
    if dist_ctx is None:
        return mine
    from ..distributed import gather_sharded
    return sorted(gather_sharded(mine, failure, dist_ctx), key=lambda b: b.start)


def _tight_solve(work: nn.Module, xb: Tensor, solver):
    """``(u, z, residual, logits)`` of the float64 copy ``work`` at ``xb`` by the certification
    solve ``solver``: the exact fixed point the certificates speak of, its residual
    ``||f(z) - z||`` per sample measured."""
    with torch.no_grad():
        u = work.inject(xb)
        z = work.solve(u, solver=solver).z
        residual = (work.f(z, u) - z).flatten(1).norm(dim=1)
        logits = work.readout(z)
    return u, z, residual, logits


def exact_logits(model: nn.Module, x: Tensor, *, solver=None, batch_size: int = 256):
    """``(logits, residual)`` (float64, per row of ``x``) of a DEQ's exact fixed point: the
    float64 tight solve of :func:`certify` (an eval-mode float64 copy of ``model``, its solver
    made strict by :func:`~robustdeq.certify._util.tight_solver` unless ``solver`` is given), not
    the model's own solver. What the certificates hold for; used to re-judge a certified sample
    at an attack's example (:mod:`robustdeq.eval.bracket`)."""
    require_deq(model, "exact_logits")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"exact_logits: batch_size must be an integer >= 1, got {batch_size!r}")
    work = float64_copy(model)
    solver = tight_solver(work) if solver is None else solver
    x = model.check_input(x).detach()
    logits, residual = [], []
    for s in range(0, x.shape[0], batch_size):
        _, _, r, lg = _tight_solve(work, x[s:s + batch_size].to(torch.float64), solver)
        logits.append(lg)
        residual.append(r)
    return torch.cat(logits), torch.cat(residual)


def _solve_batch(c: _Certification, s: int) -> _Batch:
    """The tight float64 solve of one batch (and its labels, checked against the classes)."""
    bs, work = c.cfg.batch_size, c.work
    xb = c.x[s:s + bs].detach().to(torch.float64)
    t = time.perf_counter()
    u, z, residual, logits = _tight_solve(work, xb, c.solver)
    c.clock("solve", t)
    pred = logits.argmax(dim=1)
    yb = c.y[s:s + bs].to(pred.device) if c.y is not None else None
    if yb is not None and (int(yb.min()) < 0 or int(yb.max()) >= logits.shape[1]):
        raise InputError(f"labels must be in [0, {logits.shape[1] - 1}], got "
                         f"[{int(yb.min())}, {int(yb.max())}]")
    return _Batch(s=s, xb=xb, yb=yb, z=z, u=u, residual=residual, logits=logits, pred=pred)


def _merge_batch(c: _Certification, batch: BatchResults) -> None:
    """Add a batch's results and counts to the certification (computed, read back or gathered
    from another rank), in input order."""
    c.results.extend(batch.results)
    c.n_unconverged += batch.unconverged
    c.n_refused += batch.refused
    if batch.ibp_reason is not None:
        c.ibp_reason = batch.ibp_reason
    if batch.local is not None:
        c.glob.setdefault("local", batch.local)


def _certify_batch(c: _Certification, s: int) -> BatchResults:
    """The certificates of the batch starting at input ``s`` (it changes only the timings of ``c``)."""
    cfg, work, methods = c.cfg, c.work, c.methods
    bt = _solve_batch(c, s)
    lab = bt.yb if bt.yb is not None else bt.pred
    unconverged = int((bt.residual > cfg.fp_tol).sum())
    bt.dep = _deployed(c.model, c.x[s:s + cfg.batch_size], bt.z, bt.pred, cfg.deploy_tol)
    refused = int((~bt.dep["ok"]).sum())
    local = None
    if c.bound is not None and c.bound.available:
        t = time.perf_counter()
        bt.rad = certified_radius(c.bound, bt.logits, lab, bt.residual)
        c.clock("lipschitz", t)
    if "local" in methods:
        t = time.perf_counter()
        bt.loc = local_stability(work, u=bt.u, z=bt.z, tol=cfg.fp_tol, method=cfg.local_method,
                                 iters=cfg.local_iters, dense_max=cfg.dense_max, seed=cfg.seed)
        c.clock("local", t)
        local = {"method": bt.loc.method, "exact": bt.loc.exact, "note": bt.loc.describe(), "fp_tol": cfg.fp_tol}
    if "lyapunov" in methods:
        t = time.perf_counter()
        bt.lya = lyapunov_decrease(work, bt.xb, c.V_used, steps=cfg.lyapunov_steps, perturb=cfg.perturb,
                                   z_ref=bt.z, dynamics=cfg.lyapunov_dynamics, seed=cfg.seed + s)
        c.clock("lyapunov", t)
    if "ibp" in methods:
        t = time.perf_counter()
        _ibp_batch(c, bt, lab)
        c.clock("ibp", t)
    return BatchResults(start=s, results=[_sample_result(c, bt, b) for b in range(bt.xb.shape[0])],
                        unconverged=unconverged, refused=refused, ibp_reason=bt.ibp_reason, local=local)


def _ibp_batch(c: _Certification, bt: _Batch, lab: Tensor) -> None:
    for e in c.cfg.eps_linf:
        r = ibp_certify(c.work, bt.xb, lab, e, iters=c.cfg.ibp_iters, contraction=c.cert,
                        lipschitz=c.bound, z=bt.z, residual=bt.residual)
        xf = bt.xb.flatten(1)
        dx = torch.maximum(xf - (xf - e).clamp(0, 1), (xf + e).clamp(0, 1) - xf).norm(dim=1)
        bt.ibps[_eps_key(e)] = (r, dx)
        if not r.applicable:
            bt.ibp_reason = r.reason


def _sample_result(c: _Certification, bt: _Batch, b: int) -> CertResult:
    """Sample ``b`` of the batch: stability basis, deployed-solve check, L2 radius, Linf."""
    yb, pred = bt.yb, bt.pred
    d = {"index": bt.s + b, "label": int(yb[b]) if yb is not None else None, "pred": int(pred[b]),
         "correct": bool(pred[b] == yb[b]) if yb is not None else None,
         "residual": float(bt.residual[b]), "converged": bool(bt.residual[b] <= c.cfg.fp_tol)}
    basis = _stability(c, bt, b, d)
    reached = _deployed_details(bt, b, d)
    radius = 0.0
    if bt.rad is not None:
        rad = bt.rad
        radius = float(rad.radius[b])
        if (yb is not None and not d["correct"]) or not reached:
            radius = 0.0
        d.update({"margin": float(rad.margin[b]), "margin_lower": float(rad.margin_lower[b]),
                  "radius_global": float(rad.radius_global[b]) if d["correct"] is not False else 0.0,
                  "runner_up": int(rad.runner_up[b])})
        d["l2_certified"] = {_eps_key(e): radius > e for e in c.cfg.eps_l2}
    if bt.ibps:
        d["linf"] = _linf_details(bt, b, radius, d["correct"], reached)
    method = " + ".join(basis) if basis else "no stability certificate"
    method += f"; L2 radius: {c.bound.method}, per-pair" if bt.rad is not None else "; no L2 radius"
    if bt.ibps:
        method += "; Linf: IBP or L2 radius"
    if not reached:
        method += "; refused: the deployed solve does not reach the certified fixed point"
    return CertResult(stable=bool(basis), bound=c.bound.lip_logits if bt.rad is not None else None,
                      radius=radius, method=method, details=d)


def _stability(c: _Certification, bt: _Batch, b: int, d: dict) -> List[str]:
    """Fill ``d["stability"]`` / ``d["stability_basis"]`` (and the local / Lyapunov details);
    returns the basis."""
    stab = {"contraction": bool(c.cert.certified)}
    basis = ["global contraction"] if c.cert.certified else []
    loc, lya = bt.loc, bt.lya
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
    return basis


def _deployed_details(bt: _Batch, b: int, d: dict) -> bool:
    """Fill ``d["deployed"]``; whether the deployed solve reaches the certified fixed point."""
    dep, pred = bt.dep, bt.pred
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
    return reached


def _linf_details(bt: _Batch, b: int, radius: float, correct: Optional[bool], reached: bool) -> dict:
    out = {}
    for k, (r, dx) in bt.ibps.items():
        # the Linf ball (within [0, 1]) lies in the L2 ball of radius ||dx||
        via_l2 = radius > float(dx[b])
        via_ibp = bool(r.certified[b]) if r.applicable else False
        entry = {"certified": (via_l2 or via_ibp) and correct is not False and reached,
                 "ibp": via_ibp, "via_l2_radius": via_l2}
        if r.applicable:
            entry["lower_margin"] = float(r.lower_margin[b])
        else:
            entry["reason"] = r.reason
        out[k] = entry
    return out


def _report(c: _Certification, t_all: float) -> CertReport:
    """Warnings, the global and per-sample results, timings, settings: the report."""
    cfg, model, glob, n = c.cfg, c.model, c.glob, c.x.shape[0]
    if "ibp" in c.methods:
        glob["ibp"] = ("not applicable: " + c.ibp_reason) if c.ibp_reason else \
            "interval iteration through the fixed point from an a-priori box"
    if c.n_unconverged:
        msg = (f"certify: {c.n_unconverged}/{n} samples did not reach a residual of {cfg.fp_tol:g} in the "
               f"certification solve: no local stability for them")
        warnings.warn(msg, CertificationWarning, stacklevel=user_stacklevel())
    glob["computation"] = {
        "certified": "the exact fixed point z*(x) of the model's map (float64 solve, residual per sample)",
        "deployed": {"solver": _solver_dict(model.solver_config) if hasattr(model, "solver_config") else None,
                     "dtype": str(next(iter(model.parameters())).dtype) if any(True for _ in model.parameters()) else None,
                     "deploy_tol": float(cfg.deploy_tol), "refused": c.n_refused,
                     "rule": "a sample is certified only if the model's own solve (its solver, budget, "
                             "tolerance, dtype) ends within deploy_tol (relative L2) of z* with the same "
                             "prediction; checked at the clean input"}}
    if c.n_refused:
        warnings.warn(f"certify: on {c.n_refused}/{n} samples the model's own solve does not reach the certified "
                      f"fixed point (relative gap > {cfg.deploy_tol:g} or another prediction): no robustness "
                      "certificate for them", CertificationWarning, stacklevel=user_stacklevel())
    total = time.perf_counter() - t_all
    timing = dict(c.timing)
    timing["total_s"] = total
    timing["per_sample_s"] = total / max(n, 1)
    from .. import __version__
    settings = {"eps_l2": list(cfg.eps_l2), "eps_linf": list(cfg.eps_linf), "methods": list(c.methods),
                "local_method": cfg.local_method, "local_iters": cfg.local_iters, "dense_max": cfg.dense_max,
                "lyapunov_steps": cfg.lyapunov_steps, "lyapunov_dynamics": cfg.lyapunov_dynamics,
                "ibp_iters": cfg.ibp_iters, "fp_tol": cfg.fp_tol, "spectral": cfg.spectral,
                "solver": _solver_dict(c.solver), "dtype": "float64", "seed": cfg.seed,
                "deploy_tol": float(cfg.deploy_tol), "notes": NOTES}
    prov = {"robustdeq": __version__, "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    summary = summarize(c.results, cfg.eps_l2, cfg.eps_linf)
    return CertReport(model=_model_info(model), settings=settings, global_certificates=glob,
                      results=c.results, summary=summary, timing=timing, provenance=prov)


#: the methods of :func:`certify_checkpoint`
CHECKPOINT_METHODS = ("deterministic", "smoothing")


def certify_checkpoint(path, method: str = "deterministic", *, dataset: str = "digits", split: str = "test",
                       root=None, n_inputs: Optional[int] = None, out_dir=None, map_location="cpu", **options):
    """Load a checkpoint, certify it on the first ``n_inputs`` samples of a dataset split (all by
    default) and, with ``out_dir``, save the report there (rank 0 alone in a process group).

    Args:
        path: the checkpoint file (:func:`robustdeq.checkpoint.load_model`).
        method: ``"deterministic"``: :func:`certify` (every certificate that applies to the model's
            exact fixed point; ``options`` are :class:`CertifyConfig` fields) -> :class:`CertReport`
            (``certificate.json`` / ``.md``). ``"smoothing"``: Gaussian randomized smoothing,
            :func:`robustdeq.certify.smoothing.certify` (``options`` are
            :class:`~robustdeq.certify.smoothing.SmoothingConfig` fields and ``progress``) ->
            :class:`~robustdeq.certify.smoothing.SmoothingReport` (``certificate.json`` / ``.md`` /
            ``certified_accuracy.png``).
        dataset, split, root: the data (:func:`robustdeq.data.load_dataset`; ``root`` is
            required for ``mnist`` and ``cifar10``).
        n_inputs: certify the first ``n_inputs`` samples (None: all).
        out_dir: folder to write the report to (None: not written).
        map_location: the device the model is loaded to and certified on.

    With ``out_dir`` the run is resumable: the deterministic certificates keep each batch of
    ``batch_size`` inputs in ``out_dir/partial_certify.jsonl`` as it finishes
    (:mod:`robustdeq.certify.resume`), smoothing each certified input in
    ``out_dir/partial_smoothing.jsonl`` (:mod:`robustdeq.certify.smoothing.resume`). A rerun of
    the same configuration (settings, model, data) takes what the file holds and computes the
    rest, ending with the report of an uninterrupted run (timings aside); a file of another
    configuration is discarded with a warning, and the file is removed once the report is
    written. Deterministic settings holding code (a callable ``V`` or ``perturb``) are not
    resumed. In a process group each rank keeps its own file
    (``partial_certify.rank<R>-of-<W>.jsonl``, ``partial_smoothing.rank<R>-of-<W>.jsonl``) under a
    hash that also covers the world size, a rerun of the same command resumes from them, and each
    rank removes its own once rank 0 has written the report. Partial files of another process
    layout, which the run would never read, are removed with a warning before any rank reads its
    own (by rank 0 in a group): under a process group the one-process file and the per-rank files
    of another world size, in one process the per-rank files.

    The options are checked before the checkpoint is read. The body of
    ``robustdeq certify CHECKPOINT [--smoothing SIGMA]``.
    """
    from ..checkpoint import load_model
    from ..data import load_dataset
    if method not in CHECKPOINT_METHODS:
        raise ConfigError(f"unknown certification method {method!r} for a checkpoint; expected one of "
                          f"{', '.join(CHECKPOINT_METHODS)}")
    if n_inputs is not None and (isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1):
        raise ConfigError(f"the number of inputs (n_inputs) must be a positive int, got {n_inputs!r}")
    if method == "smoothing":
        from .smoothing import certify as run
        from .smoothing.config import make_config as smoothing_config
        options = dict(options)
        progress = options.pop("progress", False)
        cfg, kwargs = smoothing_config(None, **options), {"progress": progress}
    else:
        run, cfg, kwargs = certify, make_certify_config(None, **options), {}
    model, _ = load_model(path, map_location=map_location)
    x, y = load_dataset(dataset, split, root=root)
    if n_inputs is not None:
        x, y = x[:n_inputs], y[:n_inputs]
    x, y = x.to(map_location), y.to(map_location)
    from ..distributed import context, run_on_main
    ctx = context()
    partial = None
    if out_dir is not None:
        # each certified input (smoothing) or batch (deterministic) is kept as it finishes: a
        # killed run resumes (in a process group each rank keeps its own file)
        if method == "smoothing":
            from .smoothing.resume import config_hash, smoothing_partial
            partial = smoothing_partial(out_dir, config_hash(cfg, model, x, y, ctx), x.shape[0], ctx)
        else:
            from .resume import certify_partial
            partial = certify_partial(out_dir, cfg, model, x, y, ctx)
        if partial is not None:
            kwargs["partial"] = partial
    try:
        rep = run(model, x, y, cfg, **kwargs)
    finally:
        if partial is not None:
            partial.close()
    rep.provenance.update({"checkpoint": str(path), "dataset": dataset, "split": split})
    if out_dir is not None:
        # rank 0 writes; its failure is raised on every rank, so no partial file goes before the report
        run_on_main(lambda: rep.save(out_dir), ctx)
        if partial is not None:
            partial.remove()
    return rep


def _solver_dict(cfg) -> dict:
    from ..config import SolverConfig, from_dict, to_dict
    return to_dict(from_dict(SolverConfig, cfg))


__all__ = ["certify", "certify_checkpoint", "exact_logits", "CertifyConfig", "METHODS", "CHECKPOINT_METHODS"]
