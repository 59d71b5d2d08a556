"""Certificates of a feed-forward classifier (the explicit baseline of certified training) in the
report format of :func:`robustdeq.certify.certify`.

A feed-forward network (a plain ``nn.Sequential`` of Linear, Conv2d, ReLU, Tanh, Flatten and
average pooling, ending in Linear, or robustdeq's ``FeedForward`` around one, as the zoo's
``ff_cnn`` / ``ff_mlp`` build; :func:`is_feedforward`) has no fixed point, so the DEQ
certificates (contraction, local stability, the Lipschitz radius of the equilibrium, the
deployed-solve check) do not apply. What applies is interval bound
propagation through its layers (Gowal et al. 2018): for each Linf radius the box
``[x - eps, x + eps] & [0, 1]`` is propagated layer by layer in float64 with outward rounding
(:func:`robustdeq.certify.ibp.ibp_certify_feedforward`), the last layer folded into the bounds of
``logit_y - logit_j``; a sample is certified at ``eps`` when every lower bound is ``> 0`` (which
implies it is classified correctly). No L2 radius is claimed.
"""
from __future__ import annotations

import datetime
import time
import warnings
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import CertificationWarning, ConfigError, InputError
from ..guard import preserve_model
from .._support import user_stacklevel
from ._util import check_forward_hooks, is_feedforward, meant_as_feedforward, require_feedforward
from .api import _run_batches
from .config import CertifyConfig, make_certify_config
from .report import CertReport, CertResult, _eps_key, summarize
from .resume import BatchResults

_NO_L2 = ("a feed-forward network has no certified L2 radius here (IBP through the layers "
          "certifies Linf radii only)")


#: settings of :class:`CertifyConfig` that only a DEQ's certificates use (set on a feed-forward
#: network: ConfigError, not silently ignored)
_DEQ_ONLY = ("V", "lyapunov_steps", "perturb", "lyapunov_dynamics", "local_method", "local_iters",
             "dense_max", "ibp_iters", "solver", "fp_tol", "spectral", "deploy_tol")


def certify_feedforward(model: nn.Module, x: Tensor, y: Optional[Tensor] = None,
                        config: Union[CertifyConfig, Mapping[str, Any], None] = None, *,
                        partial=None, **options: Any) -> CertReport:
    """Linf certificates of a feed-forward classifier by IBP through its layers (see the module),
    one :class:`CertResult` per sample (``details["linf"][eps]``: ``certified``, ``ibp``,
    ``lower_margin``), in a :class:`CertReport`.

    Options as for :func:`robustdeq.certify.certify`; ``eps_linf`` is required, ``methods`` must
    be ``"auto"`` or ``["ibp"]`` (the other methods need a fixed point: ConfigError, as is any
    setting only a DEQ's certificates use, e.g. ``solver`` or ``deploy_tol``), ``eps_l2``
    gets no certificate (said in the report and by a :class:`CertificationWarning`). ``y`` None:
    the predictions are certified instead (certified fractions). ``partial``: batches kept on
    disk, as for :func:`robustdeq.certify.certify`.

    Inside a process group the batches are shared out as by :func:`robustdeq.certify.certify`
    (batch ``j`` on rank ``j % world_size``; ``partial`` is this rank's file) and every rank
    returns the whole report; an exception on one rank is raised on every rank."""
    cfg = make_certify_config(config, **options)
    require_feedforward(model, "certify_feedforward")
    if cfg.methods != "auto":
        other = [m for m in cfg.methods if m != "ibp"]
        if other:
            raise ConfigError(f"method(s) {other} need a DEQ's fixed point; a feed-forward network "
                              f"({type(model).__name__}) is certified by 'ibp' alone")
    default = CertifyConfig()
    deq_only = [f for f in _DEQ_ONLY if getattr(cfg, f) != getattr(default, f)]
    if deq_only:
        raise ConfigError(f"option(s) {deq_only} concern a DEQ's fixed point; a feed-forward network "
                          f"({type(model).__name__}) has none (certified by IBP through its layers)")
    if not cfg.eps_linf:
        raise ConfigError(f"a feed-forward network ({type(model).__name__}) has no DEQ fixed point for the L2 "
                          "certificates: it is certified by IBP at Linf radii; give eps_linf (--eps-linf)")
    x = torch.as_tensor(x)
    n = x.shape[0]
    if y is not None:
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != n or y.dtype in (torch.float16, torch.float32, torch.float64):
            raise InputError(f"labels must be a 1-D integer tensor of length {n}, got shape "
                             f"{tuple(y.shape)} and dtype {y.dtype}")
    hooks = check_forward_hooks(model, "certify")   # warned; interval bounds do not see them
    t_all = time.perf_counter()
    t_ibp = [0.0]
    from ..distributed import context
    dist_ctx = context()
    with preserve_model(model, "eval", who="certify"), torch.no_grad():
        batches = _run_batches(n, cfg, dist_ctx, lambda s: _feedforward_batch(model, x, y, cfg, s, t_ibp),
                               partial)
    results = [r for batch in batches for r in batch.results]
    if cfg.eps_l2:
        warnings.warn(f"certify: {type(model).__name__} gets no certified L2 radius ({_NO_L2})",
                      CertificationWarning, stacklevel=user_stacklevel())
    total = time.perf_counter() - t_all
    from .. import __version__
    info = getattr(model, "robustdeq_config", None) or {}
    glob = {"network": "feed-forward: one pass, no fixed point (no contraction or deployed-solve check needed)",
            "lipschitz": {"available": False, "reason": _NO_L2},
            "ibp": "interval propagation through the layers (float64, outward-rounded)",
            "available": {"ibp": "yes", "lipschitz": f"no: {_NO_L2}"}}
    if hooks is not None:
        glob["hooks"] = hooks
    settings = {"eps_l2": list(cfg.eps_l2), "eps_linf": list(cfg.eps_linf), "methods": ["ibp"],
                "dtype": "float64", "batch_size": cfg.batch_size,
                "notes": ["IBP boxes enclose the network's activations for every x' in the Linf ball "
                          "intersected with [0, 1] (interval arithmetic layer by layer, outward-rounded)."]}
    return CertReport(model={"name": info.get("name"), "options": info.get("options"), "class": type(model).__name__,
                             "cell": "feed-forward", "solver": None},
                      settings=settings, global_certificates=glob, results=results,
                      summary=summarize(results, cfg.eps_l2, cfg.eps_linf),
                      timing={"ibp_s": t_ibp[0], "total_s": total, "per_sample_s": total / max(n, 1)},
                      provenance={"robustdeq": __version__, "torch": torch.__version__,
                                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                      timespec="seconds")})


def _feedforward_batch(model: nn.Module, x: Tensor, y: Optional[Tensor], cfg: CertifyConfig, s: int,
                       t_ibp: list) -> BatchResults:
    """The certificates of the batch starting at input ``s`` (IBP's seconds added to ``t_ibp[0]``)."""
    from .ibp import ibp_certify_feedforward
    xb = x[s:s + cfg.batch_size]
    pred = model(xb).argmax(1)
    lab = y[s:s + cfg.batch_size].to(pred.device) if y is not None else pred
    per_eps = {}
    t0 = time.perf_counter()
    for e in cfg.eps_linf:
        r = ibp_certify_feedforward(model, xb, lab, float(e))
        if not r.applicable:
            raise ConfigError(f"IBP does not apply to {type(model).__name__}: {r.reason}")
        per_eps[_eps_key(e)] = r
    t_ibp[0] += time.perf_counter() - t0
    results = []
    for b in range(xb.shape[0]):
        correct = bool(pred[b] == lab[b]) if y is not None else None
        d = {"index": s + b, "label": int(lab[b]) if y is not None else None, "pred": int(pred[b]),
             "correct": correct, "stability": {}, "stability_basis": ["feed-forward network"],
             "l2_certified": {_eps_key(e): False for e in cfg.eps_l2},
             "linf": {k: {"certified": bool(r.certified[b]) and correct is not False,
                          "ibp": bool(r.certified[b]), "via_l2_radius": False,
                          "lower_margin": float(r.lower_margin[b])} for k, r in per_eps.items()}}
        results.append(CertResult(stable=True, bound=None, radius=0.0,
                                  method="feed-forward network; Linf: IBP through the layers", details=d))
    return BatchResults(start=s, results=results)


__all__ = ["is_feedforward", "meant_as_feedforward", "require_feedforward", "certify_feedforward"]
