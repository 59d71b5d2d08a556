"""The trust checks of one evaluation: :mod:`robustdeq.eval.checks` run on what the loop found.

:func:`~robustdeq.eval.harness.evaluate` attacks first, then calls :func:`run_checks`, which runs
every enabled check of the run's :class:`~robustdeq.eval.checks.CheckConfig` on the first
``subset`` samples, each under its own seed, and feeds each check the evidence the loop gathered:

- ``black_box_stronger``: the per-sample successes of the black-box and transfer units against
  those of the white-box units (a white-box unit's score-based stage, AutoAttack's Square, counts
  as black-box), else the Square stage inside a cascaded AutoAttack, else a Square probe;
- ``non_monotonic``: PGD with few and many steps at the eps whose robust accuracy is nearest 50 %,
  and the robust accuracy over the eps sweep;
- ``non_convergence``: the solver statistics of the clean and the worst-case inputs;
- ``unconverged_breaks``: every sample broken, at its worst-case example (the eps with the most
  such samples is reported);
- the others (``randomized_output``, ``softmax_output``, ``zero_gradients``,
  ``large_eps_not_chance``, ``estimator_disagreement``): the model, its adaptive views and the
  subset.

A check that raises is recorded as skipped and noted; it never loses the evaluation. The checks
run with ``warn=False``; :func:`warn_fired` emits the warnings of those that fired once the
evaluation is done.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .._support import user_stacklevel
from ..attacks.base import global_rng
from ..errors import GradientMaskingWarning, NonConvergenceWarning
from . import checks
from .checks import CheckResult
from .report import EpsResult
from .store import derive_seed
from .suites import SQUARE_QUERIES

if TYPE_CHECKING:  # the state of one evaluate() call; only read here
    from .harness import _Evaluation

logger = logging.getLogger(__name__)


def run_checks(ev: "_Evaluation") -> List[CheckResult]:
    """The enabled checks of ``ev.run.check_config`` on the first ``subset`` samples; a check that
    raises is recorded as skipped (and noted), never loses the evaluation."""
    t0 = time.perf_counter()
    cc = ev.run.check_config
    n_sub = min(cc.subset, ev.x.shape[0])
    xs, ys = ev.x[:n_sub], ev.y[:n_sub]
    out: List[CheckResult] = []
    for name, fn in _check_steps(ev, xs, ys):
        if name in cc.enabled:
            _run_check(ev, out, name, fn)
    _note_solver_only_black_box(ev, out)
    ev.timings["checks"] = time.perf_counter() - t0
    return out


def _note_solver_only_black_box(ev: "_Evaluation", results: List[CheckResult]) -> None:
    """Where the black-box-stronger check fired, note how many of the samples only black-box
    attacks broke are broken only by an unconverged solve: for those the gradient attacks are not
    blinded by masking, they follow an equilibrium that is classified correctly."""
    by_name = {c.name: c for c in results}
    bb, ub = by_name.get("black_box_stronger"), by_name.get("unconverged_breaks")
    if bb is None or ub is None or not bb.fired or ub.skipped or "only" not in bb.details:
        return
    solver_only = {i for e in ub.details.get("by_eps", []) if e["eps"] == bb.details.get("eps")
                   for i in e["samples"]}
    both = sorted(solver_only & set(bb.details["only"]))
    if both:
        ev.notes.append(
            f"{len(both)} of the {len(bb.details['only'])} samples that only black-box attacks broke "
            f"(eps {bb.details.get('eps'):g}) are broken only where the model's solve stops "
            f"unconverged (samples {both}; unconverged_breaks): for those the gradient attacks are "
            "not masked, they follow the equilibrium, which classifies them correctly")


def _check_steps(ev: "_Evaluation", xs: Tensor, ys: Tensor) -> List[Tuple[str, Callable[[], CheckResult]]]:
    m, cc, norm, seed, views = ev.model, ev.run.check_config, ev.norm, ev.protocol.seed, ev.views
    return [
        ("randomized_output", lambda: checks.check_randomized(m, xs, cc, warn=False)),
        ("softmax_output", lambda: checks.check_softmax(m, xs, cc, warn=False)),
        ("zero_gradients", lambda: checks.check_gradients(m, xs, ys, cc, warn=False)),
        ("black_box_stronger", lambda: _check_black_box(ev, xs, ys)),
        ("large_eps_not_chance", lambda: checks.check_large_eps(
            m, xs, ys, norm=norm, views=views, config=cc, seed=derive_seed(seed, "large_eps"), warn=False)),
        ("non_monotonic", lambda: _check_monotonic(ev, xs, ys)),
        ("non_convergence", lambda: _check_convergence(ev)),
        ("estimator_disagreement", lambda: checks.check_estimators(m, xs, ys, cc, warn=False)),
        ("unconverged_breaks", lambda: _check_unconverged_breaks(ev)),
    ]


def _run_check(ev: "_Evaluation", out: List[CheckResult], name: str, fn: Callable[[], CheckResult]) -> None:
    t0 = time.perf_counter()
    try:
        with global_rng(derive_seed(ev.protocol.seed, "check", name), ev.device):
            out.append(fn())
        ev.timings[f"check:{name}"] = time.perf_counter() - t0
    except Exception as e:  # a check must not lose the evaluation; the failure is recorded
        logger.exception("check %s failed", name)
        out.append(CheckResult(name, False, f"skipped: the check raised {type(e).__name__}: {e}",
                               skipped=True))
        ev.notes.append(f"check {name} could not run: {type(e).__name__}: {e}")


def _check_black_box(ev: "_Evaluation", xs: Tensor, ys: Tensor) -> CheckResult:
    """Per sample: broken by a black-box or transfer unit, or by the score-based stage (Square)
    of a white-box unit such as AutoAttack, and by no gradient attack (a white-box unit's
    successes minus its score-based stage's); the worst eps is reported. Without such evidence,
    a Square probe on the check subset."""
    cc, n_sub = ev.run.check_config, xs.shape[0]
    kinds = {u.key: u.kind for u in ev.units}
    bb_keys = [k for k, kind in kinds.items() if kind in ("black-box", "transfer")]
    wb_keys = [k for k, kind in kinds.items() if kind == "white-box"]
    best = None
    for r in ev.results:
        fl = ev.success_flags[r.eps]
        score = {k: v for k, v in _score_based_flags(ev, r).items() if k in wb_keys}
        if not (bb_keys or score):
            continue
        white = _any([fl[k] & ~score[k] if k in score else fl[k] for k in wb_keys], ev.clean_correct)
        black = _any([fl[k] for k in bb_keys] + [fl[k] & score[k] for k in score], ev.clean_correct)
        source = " + ".join(bb_keys + [f"Square inside {k}" for k in score])
        res = checks.check_black_box(white, black, cc, source=source, warn=False,
                                      details={"eps": r.eps})
        if best is None or (res.value or 0) > (best.value or 0):
            best = res
    if best is not None:
        return best
    inside = _square_inside_autoattack(ev)
    if inside is not None:  # AutoAttack's Square (thousands of queries) ran: stronger than the probe
        return inside
    if cc.black_box_queries <= 0:
        return checks.skipped("black_box_stronger", "no black-box or transfer attack in the suite "
                               "and the Square probe is disabled")
    e = max(r.eps for r in ev.results)
    white = _any([ev.success_flags[e][k] for k in wb_keys], ev.clean_correct)[:n_sub]
    survivors = ev.clean_correct[:n_sub] & ~white  # only these can show a black-box-only success
    black = torch.zeros_like(white)
    if bool(survivors.any()):
        black[survivors] = checks.square_probe(
            ev.model, xs[survivors], ys[survivors], eps=e, norm=ev.norm, queries=cc.black_box_queries,
            seed=derive_seed(ev.protocol.seed, "square"))
    probed = int(survivors.sum())
    res = checks.check_black_box(white, black, cc, warn=False,
                                  source=f"Square ({cc.black_box_queries} queries)",
                                  details={"eps": e, "probe": True, "probed": probed})
    if res.fired:
        return res
    # a short probe on a subset is no evidence that a full search finds nothing
    note = (f" (a short probe on {probed} of the samples left robust: a full score-based search, "
            f"such as the {SQUARE_QUERIES:,}-query Square in the standard suite, can break samples "
            "it misses, notably at large radii on adversarially trained models)" if probed else
            " (no sample among those checked was left robust, so there was nothing to probe)")
    return dataclasses.replace(res, message=res.message + note)


def _score_based_flags(ev: "_Evaluation", r: EpsResult) -> Dict[str, Tensor]:
    """Unit key -> (N,) bool: the samples the unit's score-based stage broke (AutoAttack's
    Square: ``describe["score_based_samples"]``), for the units that record them."""
    out = {}
    for a in r.attacks:
        idx = a.describe.get("score_based_samples") if isinstance(a.describe, dict) else None
        if idx is None:
            continue
        flags = torch.zeros_like(ev.clean_correct)
        if idx:
            flags[torch.tensor(idx, dtype=torch.long, device=flags.device)] = True
        out[a.key] = flags & ev.clean_correct
    return out


def _square_inside_autoattack(ev: "_Evaluation") -> Optional[CheckResult]:
    """The black-box evidence an AutoAttack unit already holds (None if there is none): in a
    cascade, AutoAttack only attacks the samples every earlier unit left robust, so the samples
    its Square stage breaks after its gradient-based stages (APGD, FAB) missed them were missed
    by every white-box attack before. Counted from AutoAttack's own per-stage robust accuracies
    (``robust_accuracy_after``: cumulative, per batch); the worst eps is reported. Without a
    cascade another unit may have broken those samples, so nothing is claimed. Used for units
    that do not record their score-based successes per sample (``score_based_samples``)."""
    if not ev.protocol.cascade:
        return None
    best = None
    n = int(ev.clean_correct.numel())
    for r in ev.results:
        count, seen = 0, False
        for a in r.attacks:
            recs = a.describe.get("robust_accuracy_after") if isinstance(a.describe, dict) else None
            for rec in recs or ():
                stages = [k for k in rec if k != "n"]
                if "square" not in stages or stages.index("square") == 0:
                    continue
                i = stages.index("square")
                count += int(round(rec["n"] * (rec[stages[i - 1]] - rec["square"])))
                seen = True
        if seen:
            res = checks.check_black_box_count(
                min(max(count, 0), n), n, ev.run.check_config, source="Square inside AutoAttack",
                warn=False, details={"eps": r.eps})
            if best is None or (res.value or 0) > (best.value or 0):
                best = res
    return best


def _check_monotonic(ev: "_Evaluation", xs: Tensor, ys: Tensor) -> CheckResult:
    pick = min(ev.results, key=lambda r: (abs(r.robust_accuracy - 0.5), r.eps))
    sweep = {r.eps: r.robust_accuracy for r in ev.results} if len(ev.results) > 1 else None
    return checks.check_monotonic(ev.model, xs, ys, eps=pick.eps, norm=ev.norm, views=ev.views, sweep=sweep,
                                   config=ev.run.check_config, seed=derive_seed(ev.protocol.seed, "monotonic"),
                                   warn=False)


def _check_convergence(ev: "_Evaluation") -> CheckResult:
    clean = ev.clean_traj["solver"] if ev.clean_traj else None
    adv = {r.eps: r.solver["adversarial"] for r in ev.results if r.solver}
    return checks.check_convergence(clean, adv, ev.run.check_config, warn=False)


def _check_unconverged_breaks(ev: "_Evaluation") -> CheckResult:
    best = None
    by_eps = []  # per eps attacked: the samples broken only by an unconverged solve
    for r in ev.results:
        x_adv = getattr(r, "x_adv", None)
        if x_adv is None:
            return checks.skipped("unconverged_breaks", "the worst-case examples are not at hand "
                                   "(a report reloaded from its folder)")
        robust = torch.as_tensor(r.robust, dtype=torch.bool, device=ev.clean_correct.device)
        res = checks.check_unconverged_breaks(ev.model, x_adv, ev.y, ev.clean_correct & ~robust,
                                              ev.run.check_config, batch_size=ev.protocol.batch_size,
                                              warn=False)
        res.details["eps"] = r.eps
        if res.skipped:
            return res
        by_eps.append({"eps": r.eps, "samples": list(res.details["samples"])})
        if best is None or (res.value or 0) > (best.value or 0):
            best = res
    if best is None:
        return checks.skipped("unconverged_breaks", "no eps was attacked")
    best.details["by_eps"] = by_eps
    return best


def _any(flags: List[Tensor], like: Tensor) -> Tensor:
    out = torch.zeros_like(like, dtype=torch.bool)
    for f in flags:
        out = out | f
    return out


def warn_fired(check_results: List[CheckResult]) -> None:
    """One :class:`~robustdeq.errors.GradientMaskingWarning` per fired check
    (:class:`~robustdeq.errors.NonConvergenceWarning` for ``non_convergence`` and
    ``unconverged_breaks``)."""
    for c in check_results:
        if c.fired:
            cat = (NonConvergenceWarning if c.name in ("non_convergence", "unconverged_breaks")
                   else GradientMaskingWarning)
            warnings.warn(f"[{c.name}] {c.message}", cat, stacklevel=user_stacklevel())


__all__ = ["run_checks", "warn_fired"]
