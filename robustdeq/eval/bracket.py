"""The robustness bracket: certified lower bound <= true robust accuracy <= attacked upper bound.

For every sample and eps of an evaluation, the best certificate robustdeq can give is put beside
the attacks' verdict:

- deterministic certificates of the base model (:func:`robustdeq.certify.certify`, DEQs):
  the Lipschitz L2 radius (Pabbaraju, Winston, Kolter 2021 style bounds), and for Linf threats
  interval bound propagation through the fixed point (Wei & Kolter 2022) or the L2 radius of the
  Linf ball intersected with [0, 1]; for a feed-forward network (a plain ``nn.Sequential`` or
  the zoo's ``FeedForward`` around one, :func:`robustdeq.certify.feedforward.is_feedforward`) and
  Linf, interval propagation through its layers
  (:func:`robustdeq.certify.ibp.ibp_certify_feedforward`);
- optionally randomized smoothing (Cohen, Rosenfeld, Kolter 2019; SRS of Gao, Hou, Xu, Liu 2024
  with ``srs_steps``; any mode of :mod:`robustdeq.certify.smoothing`: fixed n, ``"sequential"``
  deciding "certified at eps" for every eps of the evaluation with an anytime-valid test (L2
  threats), or ``"radius"``): the certificate of the *smoothed* classifier g. It is compared with attacks
  on g, not on the base model: PGD on the Monte-Carlo soft smoothed classifier (the SmoothAdv loss
  of Salman et al. 2019, ``-log mean_j softmax(f(x' + e_j))_y``) and the verdict of Cohen et al.'s
  PREDICT at the adversarial input.

A sample certified at eps yet broken by an attack within eps is a soundness alarm: the check
``certified_but_broken`` fires, lists every such (eps, sample, certificate, attack), warns with
:class:`~robustdeq.errors.CertificateSoundnessWarning`, and ``robustdeq eval --strict`` fails. For
base-model certificates an alarm is a contradiction (a bug in the certificate or the attack's
threat model). For smoothing, PREDICT errs with probability <= alpha per call, so an alarm is a
statistical contradiction at that level (still never averaged away).

A DEQ's certificates hold for its exact fixed point; the model deployed computes its own solver's
iterate, checked against the exact one by :func:`~robustdeq.certify.certify` at the clean input
only. So a certified sample of a DEQ that an attack broke is re-judged at the attack's example
(``EpsResult.x_adv``) by the float64 tight solve of ``certify``
(:func:`robustdeq.certify.api.exact_logits`): where that solve converges (residual <= the
``fp_tol`` of :class:`~robustdeq.certify.config.CertifyConfig`) to a fixed point classified
correctly, by more than the read-out can move within that residual (the Lipschitz bound's margin
correction of :func:`~robustdeq.certify.lipschitz.certified_radius`; without a bound the break
stays an alarm), the certificate holds and the break is the deployed solver's. Such breaks are listed
apart (``details["deployed_solver_breaks"]``, a note per eps, a
:class:`~robustdeq.errors.NonConvergenceWarning`), not as alarms. A break the exact fixed point
confirms (or that cannot be re-judged: a feed-forward network has no solver, a report read back
has no examples) stays an alarm.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import from_dict, to_dict
from ..errors import CertificateSoundnessWarning, ConfigError, NonConvergenceWarning
from .._support import user_stacklevel
from .._tensor import correct as is_correct
from .checks import CheckResult

logger = logging.getLogger(__name__)

CHECK_NAME = "certified_but_broken"
BASE_METHODS = ("lipschitz", "ibp")


@dataclass(frozen=True)
class BracketConfig:
    """What :func:`compute_bracket` certifies and how it attacks the smoothed classifier.

    methods: deterministic certificates of the base model ("lipschitz", "ibp"; IBP applies to Linf).
    smoothing: None, or :class:`~robustdeq.certify.smoothing.SmoothingConfig` fields (a dict) to
        certify the smoothed classifier too. attack_steps, attack_samples: PGD steps and noise
        samples per step of the attack on the smoothed classifier; predict_n: PREDICT samples.
    """

    methods: Tuple[str, ...] = BASE_METHODS
    smoothing: Optional[Dict[str, Any]] = None
    attack_steps: int = 10
    attack_samples: int = 32
    predict_n: int = 1000

    def __post_init__(self):
        methods = tuple(self.methods)
        unknown = [m for m in methods if m not in BASE_METHODS]
        if unknown:
            raise ConfigError(f"unknown bracket certificate(s) {unknown}; expected a subset of "
                              f"{', '.join(BASE_METHODS)} (and smoothing=... for randomized smoothing)")
        object.__setattr__(self, "methods", methods)
        for name in ("attack_steps", "attack_samples", "predict_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"BracketConfig.{name} must be an int >= 1, got {v!r}")
        if self.smoothing is not None:
            from ..certify.smoothing import make_config
            make_config(self.smoothing)  # validate early


def make_bracket_config(spec: Any) -> BracketConfig:
    """``True``/``"auto"``: Lipschitz + IBP; a list of names (``"smoothing"`` adds smoothing with
    default settings); a mapping of :class:`BracketConfig` fields; or a BracketConfig."""
    if isinstance(spec, BracketConfig):
        return spec
    if spec is True or spec == "auto":
        return BracketConfig()
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if isinstance(spec, (list, tuple)):
        names = list(spec)
        smoothing = {} if "smoothing" in names else None
        return BracketConfig(methods=tuple(n for n in names if n != "smoothing"), smoothing=smoothing)
    if isinstance(spec, Mapping):
        return from_dict(BracketConfig, spec)
    raise ConfigError(f"certify must be True, 'auto', a list of certificate names or a mapping of "
                      f"BracketConfig options, got {spec!r}")


def _smoothing_config(spec: Mapping[str, Any], threat: str, eps: List[float]):
    """The :class:`~robustdeq.certify.smoothing.SmoothingConfig` of the bracket. In
    ``mode="sequential"`` the test decides "certified at eps" for every eps of the evaluation (L2
    only: a Linf ball's L2 radius differs per sample), besides any radii the spec names."""
    from ..certify.smoothing import make_config
    scfg = make_config(spec)
    if scfg.mode != "sequential":
        return scfg
    if threat != "L2":
        raise ConfigError(f"sequential smoothing decides fixed L2 radii; the {threat} bracket needs a radius "
                          "per sample: use smoothing mode 'radius' or 'fixed'")
    given = tuple(scfg.radii) if "radii" in spec else ()
    return scfg.replace(radii=tuple(sorted(set(given) | {float(e) for e in eps})))


def _linf_l2(x: Tensor, e: float) -> Tensor:
    """(N,) L2 radius of the Linf ball of radius e intersected with [0, 1] around each x."""
    xf = x.flatten(1).double()
    return torch.maximum(xf - (xf - e).clamp(0, 1), (xf + e).clamp(0, 1) - xf).norm(dim=1)


def _base_certificates(model, x, y, eps, threat, methods, notes) -> Dict[float, List[Optional[str]]]:
    """Per eps and sample: the name of the deterministic certificate that holds, or None."""
    from ..certify import require_deq
    from ..certify.feedforward import is_feedforward, meant_as_feedforward, require_feedforward
    out = {e: [None] * x.shape[0] for e in eps}
    if not methods:
        return out
    try:
        require_deq(model, "the bracket")
    except ConfigError as err:
        why = err
        if threat == "Linf" and "ibp" in methods:
            if is_feedforward(model):   # the networks certify() takes, by the same predicate
                return _feedforward_ibp(model, x, y, eps, out, notes)
            if meant_as_feedforward(model):
                try:
                    require_feedforward(model, "the bracket's IBP")
                except ConfigError as ff_err:
                    why = ff_err
        notes.append(f"bracket: no deterministic certificate applies ({why})")
        return out
    from ..certify import certify
    use = ["lipschitz"] + (["ibp"] if "ibp" in methods and threat == "Linf" else [])
    rep = certify(model, x, y, eps_l2=tuple(eps) if threat == "L2" else (),
                  eps_linf=tuple(eps) if threat == "Linf" and "ibp" in use else (), methods=use)
    if rep.global_certificates.get("hooks"):
        notes.append(_hooks_note(rep.global_certificates["hooks"]))
    dx = {e: _linf_l2(x, e) for e in eps} if threat == "Linf" else {}
    for i, r in enumerate(rep.results):
        correct = r.details.get("correct") is not False
        for e in eps:
            if not correct:
                continue
            key = f"{float(e):g}"
            if threat == "L2":
                if "lipschitz" in methods and r.radius > e:
                    out[e][i] = "lipschitz"
            else:
                lin = (r.details.get("linf") or {}).get(key, {})
                # "certified" also holds the refusals of certify() (a deployed solve that does not
                # reach the certified fixed point): the raw IBP verdict alone is not a certificate
                if "ibp" in methods and lin.get("ibp") and lin.get("certified"):
                    out[e][i] = "ibp"
                elif "lipschitz" in methods and r.radius > float(dx[e][i]):
                    out[e][i] = "lipschitz"
    return out


def _hooks_note(hooks: dict) -> str:
    """The bracket's note of the forward hooks certify found (``global_certificates["hooks"]``)."""
    where = [k or "the model" for k in hooks.get("modules", {})] + list(hooks.get("global", []))
    return f"bracket: forward hooks ({', '.join(where)}): {hooks.get('note')}"


def _feedforward_ibp(model, x, y, eps, out, notes):
    """IBP through the layers of a feed-forward network (the explicit baseline of IBP training)."""
    from ..certify._util import check_forward_hooks
    from ..certify.ibp import ibp_certify_feedforward
    hooks = check_forward_hooks(model, "the bracket")   # warned; interval bounds do not see them
    if hooks is not None:
        notes.append(_hooks_note(hooks))
    for e in eps:
        r = ibp_certify_feedforward(model, x, y, e)
        if not r.applicable:
            notes.append(f"bracket: no deterministic certificate applies ({r.reason})")
            return out
        for i in range(x.shape[0]):
            if bool(r.certified[i]):
                out[e][i] = "ibp"
    return out


def _rejudge_at_exact_fixed_point(model, y, candidates, x_adv_by_eps, notes):
    """Split the base-model alarm candidates (certified at eps, broken by an attack) into
    ``(alarms, deployed_solver_breaks)`` by the exact fixed point at each one's attack example
    (see the module). Each entry gains ``exact_pred`` / ``exact_residual`` where re-judged."""
    from ..certify import require_deq
    from ..certify.api import exact_logits
    from ..certify.config import CertifyConfig
    if not candidates:
        return [], []
    try:
        require_deq(model, "the bracket's re-judgement")
    except ConfigError:
        return list(candidates), []      # no solver of its own (feed-forward): every break is the model's
    if any(x_adv_by_eps.get(c["eps"]) is None for c in candidates):
        notes.append("bracket: the attacks' examples are not at hand (e.g. a report read back from disk), so "
                     "the certified samples broken could not be re-judged at the exact fixed point: they stay "
                     "alarms")
        return list(candidates), []
    fp_tol = CertifyConfig().fp_tol
    rows = torch.stack([x_adv_by_eps[c["eps"]][c["index"]] for c in candidates])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        logits, residual = exact_logits(model, rows)
    pred = logits.argmax(dim=1).cpu()
    ys = torch.as_tensor([int(y[c["index"]]) for c in candidates], device=logits.device)
    # correct at the exact fixed point: the true class's logit strictly above every other (a tie
    # is wrong, the evaluation's rule; argmax would resolve it to the lower index)
    ok = is_correct(logits, ys)
    # the tight solve's iterate is within its residual of z*: where the Lipschitz bound of the
    # read-out exists, the true class must win by more than the logits can move over that
    # distance (certified_radius's margin_lower); without one, a tiny margin proves nothing
    from ..certify._util import float64_copy
    from ..certify.lipschitz import certified_radius, lipschitz_bound
    bound = lipschitz_bound(float64_copy(model))
    if bound.available:
        ok = ok & (certified_radius(bound, logits, ys, residual).margin_lower > 0)
    ok = ok.cpu()
    alarms, deployed = [], []
    for c, p, good, r in zip(candidates, pred.tolist(), ok.tolist(), residual.cpu().tolist()):
        c = dict(c, exact_pred=int(p), exact_residual=float(r) if math.isfinite(r) else None)
        if math.isfinite(r) and r <= fp_tol and good:
            deployed.append(c)
        else:
            alarms.append(c)
    return alarms, deployed


def _soft_smoothed_pgd(model, x, y, eps, norm, sigma, steps, m, seed, clip) -> Tensor:
    """PGD (no random start) on ``-log mean_j softmax(f(x' + sigma e_j))_y`` in B_eps(x) & [0, 1];
    the same ``m`` noise draws per sample at every step."""
    from .._tensor import default_alpha
    from .._tensor import project_ball as project
    from ..attacks.base import model_mode
    from ..deq.noisy import base_logits
    gen = torch.Generator().manual_seed(int(seed))
    b = x.shape[0]
    e = torch.randn((m, b) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device)
    alpha = default_alpha(eps, steps)
    x_adv = x.clone()
    view = (-1,) + (1,) * (x.dim() - 1)
    with model_mode(model, "eval"):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                xn = (x_adv.unsqueeze(0) + sigma * e).reshape((m * b,) + tuple(x.shape[1:]))
                p = torch.softmax(base_logits(model, xn, clip=clip), dim=1).reshape(m, b, -1).mean(0)
                loss = -torch.log(p.gather(1, y[:, None]).clamp_min(1e-12)).sum()
                g, = torch.autograd.grad(loss, x_adv)
            if norm == "Linf":
                step = g.sign()
            else:
                step = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            x_adv = project(x_adv.detach() + alpha * step, x, eps, norm)
    return x_adv.detach()


def compute_bracket(model: nn.Module, x: Tensor, y: Tensor, report, config: Any = True, *,
                    seed: int = 0) -> Tuple[CheckResult, List[str]]:
    """The bracket of an :class:`~robustdeq.eval.report.EvalReport` computed on ``(x, y)``:
    ``(check, notes)``; the check is ``certified_but_broken`` with the per-eps table and every
    alarm in ``details``."""
    cfg = make_bracket_config(config)
    threat = report.threat
    eps = [float(e) for e in report.eps]
    n = x.shape[0]
    notes: List[str] = []
    if len(report.results) != len(eps) or any(len(r.robust) != n for r in report.results):
        raise ConfigError("the report was not computed on these inputs (per-sample flags do not match)")
    base = _base_certificates(model, x, y, eps, threat, cfg.methods, notes)
    candidates = [{"eps": e, "index": i, "certificate": base[e][i], "classifier": "base model",
                   "attack": res.first_success[i]}
                  for e, res in zip(eps, report.results) for i in range(n)
                  if base[e][i] is not None and not bool(res.robust[i])]
    base_alarms, deployed = _rejudge_at_exact_fixed_point(
        model, y, candidates, {e: getattr(res, "x_adv", None) for e, res in zip(eps, report.results)}, notes)
    alarms: List[Dict[str, Any]] = []
    rows: List[Dict[str, Any]] = []
    per_sample: Dict[str, Any] = {}
    smooth = None
    if cfg.smoothing is not None:
        from ..certify.smoothing import ABSTAIN, certify as smooth_certify, predict
        scfg = _smoothing_config(cfg.smoothing, threat, eps)
        smooth = smooth_certify(model, x, y, scfg)
        s_rad = smooth.radius()
    for ei, (e, res) in enumerate(zip(eps, report.results)):
        key = f"{e:g}"
        robust = torch.tensor([bool(v) for v in res.robust])
        cert_by = list(base[e])
        alarms.extend(a for a in base_alarms if a["eps"] == e)
        here = [d for d in deployed if d["eps"] == e]
        row = {"eps": e, "certified_base": sum(c is not None for c in cert_by) / n,
               "attacked_base": float(robust.float().mean()), "deployed_solver_breaks": len(here)}
        entry = {"certified_by": cert_by, "attacked_robust": robust.tolist()}
        if smooth is not None:
            if scfg.mode == "sequential":   # the test's decision at eps (its radii include every eps)
                s_cert = torch.tensor([bool(r.certified_at(e)) for r in smooth.results])
            else:
                need = torch.full((n,), e, dtype=torch.float64) if threat == "L2" else _linf_l2(x, e)
                s_cert = (torch.tensor([bool(r.correct) and not r.abstained for r in smooth.results])
                          & (s_rad > need))
            x_adv = _soft_smoothed_pgd(model, x, y, e, threat, scfg.sigma, cfg.attack_steps, cfg.attack_samples,
                                       seed + 7919 * (ei + 1), scfg.clip)
            pred = predict(model, x_adv, scfg.replace(srs_steps=0, n=cfg.predict_n, seed=scfg.seed + ei + 1))
            s_ok = pred.cpu() == y.cpu()
            for i in range(n):
                if bool(s_cert[i]) and int(pred[i]) not in (int(y[i]), ABSTAIN):
                    alarms.append({"eps": e, "index": i, "certificate": "smoothing", "classifier": "smoothed",
                                   "attack": "soft-smoothed PGD + PREDICT", "prediction": int(pred[i])})
            row.update({"certified_smoothed": float(s_cert.float().mean()),
                        "attacked_smoothed": float(s_ok.float().mean()),
                        "smoothing_samples_per_image": smooth.summary.get("samples_per_image")})
            entry.update({"smoothing_certified": s_cert.tolist(), "smoothed_attacked_correct": s_ok.tolist()})
        row["alarms"] = sum(1 for a in alarms if a["eps"] == e)
        rows.append(row)
        per_sample[key] = entry
        line = (f"bracket at {threat} eps {e:g}: base model certified {100 * row['certified_base']:.1f}% "
                f"<= robust <= attacked {100 * row['attacked_base']:.1f}% ({', '.join(cfg.methods) or 'none'})")
        if smooth is not None:
            line += (f"; smoothed classifier (sigma {scfg.sigma:g}) certified {100 * row['certified_smoothed']:.1f}% "
                     f"<= robust <= attacked {100 * row['attacked_smoothed']:.1f}% (against attacks on the "
                     "smoothed classifier, not the base model)")
        if row["alarms"]:
            line += f"; {row['alarms']} SOUNDNESS ALARM(S)"
        if here:
            line += (f"; {len(here)} certified sample(s) broken by the deployed solver only (samples "
                     f"{', '.join(str(d['index']) for d in here)}: the exact fixed point at the attack's example "
                     "classifies them correctly, so the certificate holds; the model's solver does not reach it)")
        notes.append(line)
    fired = bool(alarms)
    if fired:
        shown = "; ".join(f"eps {a['eps']:g} sample {a['index']} ({a['certificate']}, {a['attack']})"
                          for a in alarms[:5])
        msg = (f"{len(alarms)} sample(s) certified at eps yet broken by an attack within eps: {shown}"
               + (" ..." if len(alarms) > 5 else ""))
    else:
        msg = "no certified sample was broken by an attack (certified <= robust <= attacked holds per sample)"
    if deployed:
        msg = (("no certificate was contradicted" if not fired else msg)
               + f"; {len(deployed)} certified sample(s) were broken by the deployed solver only (the exact "
               "fixed point at the attack's example classifies them correctly): "
               + "; ".join(f"eps {d['eps']:g} sample {d['index']} ({d['attack']})" for d in deployed[:5])
               + (" ..." if len(deployed) > 5 else ""))
    details = {"bracket": rows, "alarms": alarms, "per_sample": per_sample, "config": to_dict(cfg),
               "deployed_solver_breaks": deployed,
               "smoothing_note": ("smoothing certifies the smoothed classifier; it is compared with attacks "
                                  "on the smoothed classifier (PREDICT errs with probability <= alpha)")
               if smooth is not None else None}
    check = CheckResult(name=CHECK_NAME, fired=fired, message=msg, value=float(len(alarms)), threshold=0.0,
                        details=details)
    return check, notes


def attach_bracket(report, model: nn.Module, x: Tensor, y: Tensor, config: Any = True, *, seed: int = 0):
    """Compute the bracket and add it to ``report`` (its check and notes); warns on alarms."""
    check, notes = compute_bracket(model, x, y, report, config, seed=seed)
    report.checks.append(check)
    report.notes.extend(notes)
    if check.fired:
        warnings.warn(f"[{CHECK_NAME}] {check.message}", CertificateSoundnessWarning, stacklevel=user_stacklevel())
    deployed = check.details.get("deployed_solver_breaks") or []
    if deployed:
        warnings.warn(f"[{CHECK_NAME}] {len(deployed)} certified sample(s) broken by the model's own solver, not "
                      "at the exact fixed point the certificates cover (the deployed solve is checked at the "
                      "clean input only): "
                      + "; ".join(f"eps {d['eps']:g} sample {d['index']}" for d in deployed[:5])
                      + (" ..." if len(deployed) > 5 else "")
                      + ". They count against the deployed model's robust accuracy, which depends on its "
                        "solver budget",
                      NonConvergenceWarning, stacklevel=user_stacklevel())
    return check


__all__ = ["BracketConfig", "make_bracket_config", "compute_bracket", "attach_bracket", "CHECK_NAME"]
