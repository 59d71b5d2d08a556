"""The evaluation loop: ``evaluate(model, x, y, threat=..., eps=..., suite=...) -> EvalReport``.

For every eps, every spec of the suite (:mod:`robustdeq.eval.suites`) is run on every *target*
its scope names (the plain model and, for an inference-time defense, each of its
``adaptive_views()``; or the underlying DEQ), the examples are always *judged on the model
itself*, and a sample is robust only if it is classified correctly on the clean input and on the
example of every attack unit: the per-sample worst case. Then the trust checks run on what the
attacks found (:mod:`robustdeq.eval.audit`, which runs those of :mod:`robustdeq.eval.checks`) and
the report is assembled; with ``out_dir`` finished units are kept and reused
(:mod:`robustdeq.eval.store`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._support import progress_reporter, report_progress
from ..attacks.base import check_num_classes, global_rng
from .._tensor import ball_slack, clip_delta
from ..deq.protocols import is_trajectory_model
from ..errors import ConfigError, InputError, NonConvergenceWarning
from ..guard import preserve_model
from . import _sharding
from . import audit
from .checks import CheckResult, find_deq, margin
from .config import EvalProtocol, RunOptions, split_options
from .report import SCHEMA_VERSION, AttackResult, EpsResult, EvalReport
from .store import PartialStore, completed_report, derive_seed, hash_data, hash_model, unit_seed
from .suites import AttackSpec, SuiteContext, build_suite
from .targets import adaptive_views, is_solver_model, trajectory_model, trajectory_stats, with_solver

logger = logging.getLogger(__name__)


# -- helpers ----------------------------------------------------------------------------------------
@dataclass
class _Unit:
    key: str
    spec: AttackSpec
    view: str
    target: nn.Module

    @property
    def kind(self) -> str:
        """The spec's kind, or "transfer" on a transfer view (crafted on another model)."""
        return "transfer" if getattr(self.target, "view_kind", None) == "transfer" else self.spec.kind


def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return fallback


@contextlib.contextmanager
def _quiet(model: nn.Module, counter: Dict[str, int]):
    """Silence per-call non-convergence warnings of the DEQs inside ``model`` (the harness
    measures convergence itself) and count those raised by attacks and adjoint solves; every
    other warning is re-emitted."""
    flags = [(m, m.warn_nonconvergence) for m in model.modules() if hasattr(m, "warn_nonconvergence")]
    for m, _ in flags:
        m.warn_nonconvergence = False
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            yield
    finally:
        for m, f in flags:
            m.warn_nonconvergence = f
    for w in rec:
        if issubclass(w.category, NonConvergenceWarning):
            counter["nonconvergence_warnings"] = counter.get("nonconvergence_warnings", 0) + 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i:i + batch_size]).detach())
    return torch.cat(out)


def _margins(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    # in the logits' own precision (a float64 model's margin below float32's resolution stays)
    return margin(_logits(model, x, batch_size), y)


def _check_ball(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tuple[Tensor, int]:
    """Project ``x_adv`` into the threat model; return it and the number of violating samples."""
    b = x.shape[0]
    delta = (x_adv - x).reshape(b, -1)
    if norm == "Linf":
        bad = delta.abs().amax(dim=1) > eps + ball_slack(eps)
    else:
        bad = delta.norm(dim=1) > eps + ball_slack(eps)
    bad = bad | (x_adv.reshape(b, -1).amin(dim=1) < -1e-6) | (x_adv.reshape(b, -1).amax(dim=1) > 1 + 1e-6)
    bad = bad | ~torch.isfinite(x_adv.reshape(b, -1)).all(dim=1)
    nbad = int(bad.sum())
    if nbad:
        x_adv = torch.nan_to_num(x_adv, nan=0.0, posinf=1.0, neginf=0.0)
        x_adv = (x + clip_delta(x_adv - x, eps, norm)).clamp(0, 1)
    return x_adv, nbad


def _describe(atk: Any) -> Dict[str, Any]:
    d = {}
    if hasattr(atk, "describe"):
        try:
            d = dict(atk.describe())
        except Exception as e:  # pragma: no cover - a third-party attack's describe failing
            d = {"describe_error": repr(e)}
    d.setdefault("name", getattr(atk, "name", type(atk).__name__))
    d.setdefault("implementation", getattr(atk, "implementation", type(atk).__module__))
    return d


def _version(pkg: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None



# -- the harness ------------------------------------------------------------------------------------
def _validate_data(model, x, y) -> Tuple[Tensor, Tensor]:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module mapping x -> logits, got {type(model).__name__}")
    if y is None and isinstance(x, (tuple, list)) and len(x) == 2:
        x, y = x
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError("evaluate needs tensors x (N, ...) and y (N,) (or data=(x, y))")
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"y must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise InputError("evaluate needs at least one sample")
    from ..data import validate_inputs
    return validate_inputs(x, expected_shape=getattr(model, "input_shape", None)), y


@dataclass
class _Evaluation:
    """The state of one :func:`evaluate` call, handed to its steps (instead of long argument lists);
    after the attacks, :func:`robustdeq.eval.audit.run_checks` reads what they found (``units``,
    ``results``, ``success_flags``, ``clean_correct``, ``clean_traj``)."""

    model: nn.Module
    x: Tensor
    y: Tensor
    protocol: EvalProtocol
    run: RunOptions
    device: torch.device
    dist_ctx: Any                                   # a process group (robustdeq.distributed) or None
    views: Dict[str, nn.Module]
    tmodel: Optional[nn.Module]
    notes: List[str] = dataclasses.field(default_factory=list)
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)
    counters: Dict[str, int] = dataclasses.field(default_factory=dict)
    clean_margin: Optional[Tensor] = None
    num_classes: Optional[int] = None
    clean_correct: Optional[Tensor] = None
    clean_traj: Optional[Dict[str, Any]] = None
    units: List[_Unit] = dataclasses.field(default_factory=list)
    suite_label: Any = None
    config: Dict[str, Any] = dataclasses.field(default_factory=dict)  # what the config hash covers
    config_hash: str = ""
    store: Any = None                               # PartialStore (or its sharded view) or None
    bar: Any = None
    results: List[EpsResult] = dataclasses.field(default_factory=list)
    success_flags: Dict[float, Dict[str, Tensor]] = dataclasses.field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.dist_ctx is None or self.dist_ctx.is_main

    @property
    def norm(self) -> str:
        return self.protocol.norm


@dataclass
class _EpsState:
    """The running worst case over the attack units of one eps."""

    ei: int
    eps: float
    robust: Tensor
    first: List[Optional[str]]
    worst_margin: Tensor
    worst_x: Tensor
    attack_results: List[AttackResult] = dataclasses.field(default_factory=list)


@dataclass
class _UnitOutcome:
    """What one attack unit produced (computed now, or read back from ``out_dir/partial``)."""

    adv_correct: Tensor
    upd_idx: Tensor
    upd_x: Tensor
    margin: Tensor
    seconds: float
    describe: Dict[str, Any]
    violations: int
    resumed: bool


def evaluate(model: nn.Module, x: Union[Tensor, Tuple[Tensor, Tensor]], y: Optional[Tensor] = None,
             config: Union[EvalProtocol, Dict[str, Any], None] = None, **options: Any) -> EvalReport:
    """Evaluate the robustness of ``model`` on ``(x, y)``.

    Args:
        model: ``x -> logits``: a DEQ, a weight-tied or feed-forward model, or an inference-time
            defense (with ``adaptive_views()``: every view is attacked as well, judged on the
            defense).
        x: (N, C, H, W) inputs in [0, 1] (or ``(x, y)`` with ``y`` omitted); y: (N,) int64 labels.
        config: an :class:`~robustdeq.eval.config.EvalProtocol` (or a mapping of options);
            ``options`` (the same names as keywords) build the protocol and the
            :class:`~robustdeq.eval.config.RunOptions` or override their fields; an unknown
            option is a :class:`ConfigError`. The options:

    Options (the protocol: what determines the numbers and the report's configuration hash):
        threat: "Linf" or "L2" (or a :class:`~robustdeq.config.Norm`). eps: one radius or a list
            (one report entry per eps); required.
        suite: a registered suite ("quick", "standard", "full" or one added with
            :func:`register_suite`), or a list of :class:`AttackSpec`, attack names (see
            :func:`builtin_spec`, :func:`register_attack_spec`) or named factories
            ``f(target, *, eps, norm, steps, seed)``.
        steps: iterations of the iterative attacks (alpha = 2.5 eps / steps).
        seed: base seed; every unit and check gets a seed derived from it.
        batch_size: attack and prediction batch size (an attack draws its random starts per batch).
        cascade: run each attack only on the samples every earlier attack left robust (as
            AutoAttack does: much cheaper with expensive attacks; the robust flags are the same
            worst case, but an attack's accuracy *alone* is then undefined and reported as None).
        solver: a :class:`~robustdeq.config.SolverConfig` (or mapping) the DEQ is solved with for
            the whole evaluation (clean pass, attacks, judgement) instead of its own; the model
            itself is not changed (the evaluation runs on a shallow copy sharing its parameters).
            Only for a model that runs a solver.

    Run options:
        out_dir: write ``partial/`` units as they finish, then ``report.json``, ``report.md`` and
            plots. resume: skip units already in ``out_dir/partial`` for the same configuration.
        progress: tqdm progress bar. checks: run the checks (:mod:`robustdeq.eval.checks`);
            check_config: their :class:`CheckConfig`.
        tensorboard: True (``out_dir/tensorboard``) or a log folder: write scalars.
        callback: called after every finished unit with a dict (eps, key, accuracy, ...).
        transfer_from: surrogate model(s) (a module, or a dict name -> module) whose adversarial
            examples every attack of the suite also crafts and judges on ``model`` (views
            ``transfer-<name>``). A wrapper holding its base model as ``model.model`` (an
            inference-time defense) always gets ``transfer-base``.
        certify: the robustness bracket (:mod:`robustdeq.eval.bracket`): ``True``/``"auto"``
            (Lipschitz and IBP certificates), a list of names (``"smoothing"`` included) or a
            mapping of :class:`~robustdeq.eval.bracket.BracketConfig` options; adds the check
            ``certified_but_broken`` (certified yet attacked samples; for a DEQ those whose exact
            fixed point at the attack's example is still correct are listed apart as breaks of
            the deployed solver) and one note per eps.

    The model (every training flag, ``requires_grad`` flag, parameter and buffer) is the same after
    the evaluation as before it.

    Inside a process group (``torchrun``; :mod:`robustdeq.distributed`) the attack batches are
    shared out over the ranks and the report, returned on every rank, equals the single-process
    report flag for flag; every rank must pass the same model and data; rank 0 writes ``out_dir``
    and TensorBoard (see :mod:`robustdeq.eval._sharding`).

    Returns:
        :class:`EvalReport`.
    """
    t_start = time.perf_counter()
    x, y = _validate_data(model, x, y)
    protocol, run = split_options(config, **options)
    model = with_solver(model, protocol.solver)
    ev = _begin(model, x, y, protocol, run)
    from .. import runlock
    with runlock.hold_group(ev.run.out_dir, ev.dist_ctx):  # one run per output folder (rank 0 owns it)
        return _evaluate(ev, model, t_start)


def _evaluate(ev: "_Evaluation", model: nn.Module, t_start: float) -> EvalReport:
    with preserve_model([model, *ev.views.values()], "eval", who="evaluate"), _quiet(model, ev.counters):
        if not hasattr(model, "adaptive_views"):  # a defense's views are checked by each attack
            from ..attacks.base import check_input_gradient
            check_input_gradient(model, ev.x, who="evaluate")
        _clean_pass(ev)
        _plan(ev)
        done = _finished_report(ev)
        if done is not None:
            return done
        _open_store(ev)
        _attack_all(ev)
        check_results = audit.run_checks(ev) if ev.run.checks else []
    _warn(ev, check_results)  # outside the warning capture
    report = _report(ev, check_results, t_start)
    _write(ev, report)
    return report


def _begin(model: nn.Module, x: Tensor, y: Tensor, protocol: EvalProtocol, run: RunOptions) -> _Evaluation:
    dist_ctx = _sharding.context()  # a process group (or torchrun's environment): shard the attacks
    device = _device(model, x.device)
    return _Evaluation(model=model, x=x.detach().to(device), y=y.detach().to(device), protocol=protocol,
                       run=run, device=device, dist_ctx=dist_ctx, views=adaptive_views(model, run.transfer_from),
                       tmodel=trajectory_model(model))


def _clean_pass(ev: _Evaluation) -> None:
    """Clean margins and the clean trajectory statistics."""
    t0 = time.perf_counter()
    with global_rng(derive_seed(ev.protocol.seed, "clean"), ev.device):
        logits = _logits(ev.model, ev.x, ev.protocol.batch_size)
        check_num_classes(ev.y, logits)
        ev.num_classes = int(logits.shape[1])
        ev.clean_margin = margin(logits, ev.y)
    ev.clean_correct = ev.clean_margin > 0
    ev.timings["clean"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev.clean_traj = trajectory_stats(ev.tmodel, ev.x, ev.y, ev.protocol.batch_size) if ev.tmodel is not None else None
    ev.timings["trajectory"] = time.perf_counter() - t0


def _suite_context(ev: _Evaluation) -> SuiteContext:
    tmodel = ev.tmodel
    solver_model = is_solver_model(tmodel)
    if solver_model:
        max_state = tmodel.solver_config.max_iter - 1
        s = (ev.clean_traj or {}).get("solver") or {}
        horizon = int(math.ceil(s.get("mean_steps", max_state + 1)))
        horizon = max(2, min(horizon, max_state + 1))
    elif tmodel is not None and hasattr(tmodel, "depth"):
        max_state = int(tmodel.depth)
        horizon = int(tmodel.depth)
    else:
        max_state = horizon = None
    return SuiteContext(model=ev.model, trajectory_model=tmodel, has_deq=find_deq(ev.model) is not None,
                        solver_model=solver_model, randomized=bool(getattr(ev.model, "randomized", False)),
                        horizon=horizon, max_state=max_state,
                        num_classes=ev.num_classes, threat=ev.norm, input_shape=tuple(ev.x.shape[1:]))


def _plan(ev: _Evaluation) -> None:
    """The suite's attack units for this model, and the configuration hash they run under."""
    specs = build_suite(ev.protocol.suite, _suite_context(ev))
    if ev.tmodel is not None and find_deq(ev.model) is None:
        ev.notes.append(f"{type(ev.tmodel).__name__} has no fixed-point solver whose gradient can be "
                        "chosen: PGD runs with the model's own gradient (full backpropagation)")
    if ev.tmodel is None:
        ev.notes.append("the model exposes no trajectory: per-state accuracy, solver statistics and "
                        "intermediate-state attacks do not apply")
    ev.units = _expand(specs, ev.model, ev.views, ev.tmodel, ev.notes)
    if not ev.units:
        raise ConfigError("no attack of the suite applies to this model")
    ev.suite_label = ev.protocol.suite if isinstance(ev.protocol.suite, str) else [s.name for s in specs]
    # the configuration hash: the protocol, the model, the data and the attack units
    ev.config = {
        "schema_version": SCHEMA_VERSION, "model": hash_model(ev.model), "data": hash_data(ev.x, ev.y),
        **ev.protocol.fingerprint(ev.suite_label), "units": [u.key for u in ev.units],
        "transfer_sources": {k: hash_model(v.model) for k, v in ev.views.items()
                             if getattr(v, "view_kind", None) == "transfer"},
    }
    describe = getattr(ev.model, "describe", None)
    if callable(describe):  # an inference-time defense's settings are not in its state dict
        ev.config["describe"] = json.loads(json.dumps(describe(), sort_keys=True, default=str))
    ev.config_hash = hashlib.sha256(json.dumps(ev.config, sort_keys=True).encode()).hexdigest()


def _finished_report(ev: _Evaluation) -> Optional[EvalReport]:
    if ev.run.out_dir is None or not ev.run.resume:
        return None
    rep = completed_report(Path(ev.run.out_dir), ev.config_hash)
    if rep is None:
        return None
    lacks = _report_lacks(ev, rep)
    if lacks:  # same attacks, but not what this run reports besides them: recomputed
        logger.warning("%s holds the finished evaluation of this configuration, but %s; recomputing it",
                       Path(ev.run.out_dir) / "report.json", lacks)
        return None
    return rep


def _report_lacks(ev: _Evaluation, rep: EvalReport) -> Optional[str]:
    """What a finished report of this configuration lacks of this run's checks and bracket
    (None: it is this run's report)."""
    from ..config import to_dict
    from .bracket import CHECK_NAME, make_bracket_config

    def norm(v):
        return json.loads(json.dumps(v, sort_keys=True, default=str))
    want = (None if ev.run.certify is None or ev.run.certify is False
            else norm(to_dict(make_bracket_config(ev.run.certify))))
    have = next((c.details.get("config") for c in rep.checks
                 if c.name == CHECK_NAME and isinstance(c.details, dict)), None)
    if norm(have) != want:
        return ("it has no certificate bracket" if have is None else
                "its certificate bracket is another one" if want is not None else
                "it has a certificate bracket this run does not ask for")
    had_checks = rep.provenance.get("checks", any(c.name != CHECK_NAME for c in rep.checks))
    if bool(had_checks) != ev.run.checks:
        return "it was computed without the checks" if ev.run.checks else "it holds checks this run turns off"
    if ev.run.checks and norm(rep.provenance.get("check_config")) != norm(_provenance_check_config(ev)):
        return "its checks ran with another check_config"
    return None


def _open_store(ev: _Evaluation) -> None:
    _sharding.check_same_config(ev.config_hash, ev.dist_ctx)
    ev.store = _sharding.open_store(
        lambda: PartialStore(Path(ev.run.out_dir), ev.config_hash, ev.config, ev.run.resume), ev.run.out_dir, ev.dist_ctx)


def _attack_all(ev: _Evaluation) -> None:
    """Every attack unit at every eps; fills ``ev.results`` and ``ev.success_flags``."""
    from tqdm.auto import tqdm
    ev.bar = tqdm(total=len(ev.protocol.eps) * len(ev.units), desc="evaluate", disable=not ev.run.progress or not ev.main,
                  leave=False)
    t_attacks = 0.0
    t_traj = ev.timings["trajectory"]
    try:
        for ei, e in enumerate(ev.protocol.eps):
            t_eps = time.perf_counter()
            st = _EpsState(ei=ei, eps=e, robust=ev.clean_correct.clone(),
                           first=[None if c else "clean" for c in ev.clean_correct.tolist()],
                           worst_margin=ev.clean_margin.clone(), worst_x=ev.x.clone())
            ev.success_flags[e] = {}
            for ui, unit in enumerate(ev.units):
                t_attacks += _attack_unit(ev, st, ui, unit)
            t0 = time.perf_counter()
            per_state, solver, rcurve = _adversarial_trajectory(ev, st.worst_x)
            t_traj += time.perf_counter() - t0
            ev.results.append(EpsResult(
                eps=e, robust_accuracy=float(st.robust.float().mean()), attacks=st.attack_results,
                robust=st.robust.tolist(), first_success=st.first, per_state=per_state, solver=solver,
                residual_curve=rcurve, seconds=time.perf_counter() - t_eps))
            ev.results[-1].x_adv = st.worst_x  # each sample's worst case found (not serialised)
    finally:
        ev.bar.close()
    ev.timings["attacks"] = t_attacks
    ev.timings["trajectory"] = t_traj


def _attack_unit(ev: _Evaluation, st: _EpsState, ui: int, unit: _Unit) -> float:
    """Run (or reload) one unit at ``st.eps`` and fold it into the worst case; its seconds."""
    t0 = time.perf_counter()
    out = _load_unit(ev, st, ui, unit)
    if out is None:
        out = _compute_unit(ev, st, ui, unit, t0)
    _merge_unit(ev, st, unit, ui, out)
    return out.seconds


def _load_unit(ev: _Evaluation, st: _EpsState, ui: int, unit: _Unit) -> Optional[_UnitOutcome]:
    loaded = (ev.store.load(st.ei, ui, unit.key, eps=st.eps, n=int(ev.x.shape[0]))
              if ev.store is not None else None)
    if loaded is None:
        return None
    meta, tens = loaded
    dev = ev.device
    return _UnitOutcome(adv_correct=tens["adv_correct"].to(dev).bool(), upd_idx=tens["upd_idx"].to(dev).long(),
                        upd_x=tens["upd_x"].to(device=dev, dtype=ev.x.dtype), margin=tens["margin"].to(dev),
                        seconds=float(meta["seconds"]), describe=meta["describe"],
                        violations=int(meta["violations"]), resumed=True)


def _compute_unit(ev: _Evaluation, st: _EpsState, ui: int, unit: _Unit, t0: float) -> _UnitOutcome:
    e = st.eps
    useed = unit_seed(ev.protocol.seed, e, unit.key)
    attacked = st.robust.clone() if ev.protocol.cascade else ev.clean_correct
    status = f"eps {e:g} · {unit.key} · {int(attacked.sum())} samples"
    ev.bar.set_postfix_str(status)
    with global_rng(useed, ev.device), progress_reporter(_show_progress(ev.bar, status)):
        desc, x_adv, viol = _run_unit(ev, unit, attacked, e, useed)
        margin_u = torch.where(attacked, _margins(ev.model, x_adv, ev.y, ev.protocol.batch_size), ev.clean_margin)
    # samples not attacked (cascade: already broken) count as not broken by it
    adv_correct = ev.clean_correct & (margin_u > 0)
    upd_idx = (attacked & (margin_u < st.worst_margin)).nonzero().flatten()
    out = _UnitOutcome(adv_correct=adv_correct, upd_idx=upd_idx, upd_x=x_adv[upd_idx], margin=margin_u,
                       seconds=time.perf_counter() - t0, describe=desc, violations=viol, resumed=False)
    if ev.store is not None:
        ev.store.save(st.ei, ui, {  # the store ties the tensors to this unit (key, eps, hash)
            "key": unit.key, "spec": unit.spec.name, "view": unit.view, "kind": unit.kind, "eps": e,
            "seconds": out.seconds, "describe": desc, "violations": viol},
            {"adv_correct": adv_correct, "margin": margin_u, "upd_idx": upd_idx, "upd_x": out.upd_x})
    return out


def _merge_unit(ev: _Evaluation, st: _EpsState, unit: _Unit, ui: int, out: _UnitOutcome) -> None:
    e = st.eps
    st.worst_margin[out.upd_idx] = out.margin[out.upd_idx]
    st.worst_x[out.upd_idx] = out.upd_x
    newly = st.robust & ~out.adv_correct
    for i in newly.nonzero().flatten().tolist():
        st.first[i] = unit.key
    st.robust = st.robust & out.adv_correct
    ev.success_flags[e][unit.key] = ev.clean_correct & ~out.adv_correct
    if out.violations:
        ev.notes.append(f"{unit.key} at eps {e:g}: {out.violations} examples left the threat model "
                        "and were projected back before judging")
    ar = AttackResult(key=unit.key, spec=unit.spec.name, view=unit.view, kind=unit.kind,
                      accuracy=None if ev.protocol.cascade else float(out.adv_correct.float().mean()),
                      cumulative_accuracy=float(st.robust.float().mean()),
                      new_successes=int(newly.sum()), seconds=out.seconds, describe=out.describe,
                      resumed=out.resumed, violations=out.violations)
    st.attack_results.append(ar)
    logger.info("eps %g %s: accuracy %s, worst case %.3f%s", e, unit.key,
                "n/a (cascade)" if ar.accuracy is None else f"{ar.accuracy:.3f}",
                ar.cumulative_accuracy, " (resumed)" if out.resumed else "")
    ev.bar.update(1)
    ev.bar.set_postfix(eps=f"{e:g}", robust=f"{ar.cumulative_accuracy:.3f}")
    if ev.run.callback is not None:
        ev.run.callback({"eps": e, "eps_index": st.ei, "unit_index": ui, "key": unit.key,
                      "accuracy": ar.accuracy, "cumulative_accuracy": ar.cumulative_accuracy,
                      "resumed": out.resumed})


def _adversarial_trajectory(ev: _Evaluation, worst_x: Tensor):
    """(per_state, solver, residual_curve) of the worst-case examples next to the clean ones."""
    per_state = solver = rcurve = None
    clean = ev.clean_traj
    if ev.tmodel is None:
        return per_state, solver, rcurve
    adv = trajectory_stats(ev.tmodel, worst_x, ev.y, ev.protocol.batch_size)
    if clean and clean["per_state"] and adv["per_state"]:
        per_state = {"steps": clean["per_state"]["steps"], "clean": clean["per_state"]["accuracy"],
                     "adversarial": adv["per_state"]["accuracy"]}
    if clean and clean["solver"] is not None:
        solver = {"clean": clean["solver"], "adversarial": adv["solver"]}
        rcurve = {"clean": clean["residual_curve"], "adversarial": adv["residual_curve"]}
    return per_state, solver, rcurve


def _warn(ev: _Evaluation, check_results: List[CheckResult]) -> None:
    """The fired checks' warnings, and a note counting the non-convergence warnings that attacks
    and adjoint solves raised (run outside the warning capture)."""
    audit.warn_fired(check_results)
    counters = ev.counters
    if ev.dist_ctx is not None:  # the ranks' attack objects warned separately: their total
        counters["nonconvergence_warnings"] = _sharding.sum_int(
            counters.get("nonconvergence_warnings", 0), ev.dist_ctx, ev.device)
    if counters.get("nonconvergence_warnings"):
        ev.notes.append(f"{counters['nonconvergence_warnings']} non-convergence warnings were raised by "
                        "attacks or adjoint solves during the evaluation (see the non_convergence check for "
                        "the forward solves)")


def _report(ev: _Evaluation, check_results: List[CheckResult], t_start: float) -> EvalReport:
    traj = ev.clean_traj
    provenance = _provenance(ev)
    ev.timings["total"] = time.perf_counter() - t_start
    clean_acc = float(ev.clean_correct.float().mean())
    report = EvalReport(
        clean_accuracy=clean_acc, n_samples=ev.x.shape[0], threat=ev.norm, eps=list(ev.protocol.eps),
        suite=ev.suite_label, results=ev.results,
        clean={"accuracy": clean_acc,
               "per_state": traj["per_state"] if traj else None,
               "solver": traj["solver"] if traj else None,
               "residual_curve": traj["residual_curve"] if traj else None,
               **({k: traj[k] for k in ("residual_running_fraction", "residual_tolerance")
                   if traj and k in traj})},
        checks=check_results, timings=ev.timings, provenance=provenance, notes=ev.notes,
        config_hash=ev.config_hash)
    if ev.run.certify is not None and ev.run.certify is not False:
        from .bracket import attach_bracket
        attach_bracket(report, ev.model, ev.x, ev.y, ev.run.certify, seed=ev.protocol.seed)
    return report


def _write(ev: _Evaluation, report: EvalReport) -> None:
    if ev.run.out_dir is not None and ev.main:  # in a process group rank 0 writes
        report.save(ev.run.out_dir)
        if ev.store is not None:
            ev.store.remove()
    if ev.run.tensorboard and ev.main:
        log_dir = (Path(ev.run.tensorboard) if isinstance(ev.run.tensorboard, (str, Path))
                   else Path(ev.run.out_dir) / "tensorboard")
        report.write_tensorboard(log_dir)


def _expand(specs: List[AttackSpec], model: nn.Module, views: Dict[str, nn.Module],
            tmodel: Optional[nn.Module], notes: List[str]) -> List[_Unit]:
    units: List[_Unit] = []
    for s in specs:
        if s.scope == "views":
            targets = [("model", model)] + list(views.items())
        elif s.scope == "model":
            targets = [("model", model)]
        else:
            if tmodel is None:
                notes.append(f"{s.name} skipped: the model has no trajectory")
                continue
            targets = [("model" if tmodel is model else "deq", tmodel)]
        for vname, target in targets:
            if s.needs == "deq" and find_deq(target) is None:
                notes.append(f"{s.name} skipped on {vname}: no DEQ whose gradient can be chosen")
                continue
            if s.needs == "trajectory" and not is_trajectory_model(target):
                notes.append(f"{s.name} skipped on {vname}: no trajectory")
                continue
            if s.needs == "solver" and not is_solver_model(target):
                notes.append(f"{s.name} skipped on {vname}: no fixed-point solver")
                continue
            key = s.name if vname == "model" else f"{s.name}@{vname}"
            units.append(_Unit(key, s, vname, target))
    return units


def _run_unit(ev: _Evaluation, unit: _Unit, attacked: Tensor, eps: float, seed: int):
    """Build the attack, run it on the samples ``attacked`` (N,) bool; returns (describe, x_adv,
    violations); ``x_adv`` is ``x`` on the other samples."""
    x, y, norm, batch_size = ev.x, ev.y, ev.norm, ev.protocol.batch_size
    atk = unit.spec.factory(unit.target, eps=eps, norm=norm, steps=ev.protocol.steps, seed=seed)
    if not callable(atk):
        raise ConfigError(f"the factory of {unit.spec.name!r} returned {type(atk).__name__}, not an attack")
    desc = _describe(atk)
    desc["target"] = unit.view
    idx = attacked.nonzero().flatten()
    x_adv = x.clone()
    viol = 0
    # in a process group each rank claims whole batches (one process: all of them); the global
    # RNG restarts from the unit seed at every batch, so a batch's examples do not depend on the
    # batches before it nor on the rank that attacks it
    ctx = _sharding.context(auto_init=False)
    mine = torch.zeros_like(attacked) if ctx is not None else None
    for i in _sharding.owned_batches(range(0, idx.numel(), batch_size), ctx):
        b = idx[i:i + batch_size]
        xb = x[b]
        with global_rng(seed, x.device):
            xa = atk(xb, y[b])
        if not isinstance(xa, Tensor) or xa.shape != xb.shape:
            raise ConfigError(f"attack {unit.key!r} returned {type(xa).__name__} "
                              f"{tuple(getattr(xa, 'shape', ()))} for inputs {tuple(xb.shape)}")
        xa, nb = _check_ball(xa.detach().to(device=x.device, dtype=x.dtype), xb, eps, norm)
        viol += nb
        x_adv[b] = xa
        stats = getattr(atk, "last_stats", None) or {}
        per_attack = stats.get("robust_accuracy_after")
        if per_attack and ctx is None:  # AutoAttack's own per-attack accuracies, per batch
            desc.setdefault("robust_accuracy_after", []).append(
                {"n": int(b.numel()), **{k: float(v) for k, v in per_attack.items()}})
        score = stats.get("score_based")
        if isinstance(score, Tensor) and score.shape == (b.numel(),) and ctx is None:
            # the samples a score-based stage of the attack (AutoAttack's Square) broke
            desc.setdefault("score_based_samples", []).extend(b[score.to(b.device)].tolist())
        if mine is not None:
            mine[b] = True
        report_progress(done=min(i + batch_size, idx.numel()), total=idx.numel())
    if ctx is not None:  # every rank gets every rank's examples
        x_adv = _sharding.merge_rows(x_adv, mine, ctx)
        viol = _sharding.sum_int(viol, ctx, x.device)
    return desc, x_adv, viol


def _show_progress(bar, status: str):
    """A progress reporter writing where the running unit stands into the bar's postfix."""
    def show(info: Dict[str, Any]) -> None:
        parts = [status]
        if info.get("stage"):
            parts.append(str(info["stage"]))
        if "done" in info and "total" in info:
            parts.append(f"{info['done']}/{info['total']} samples done")
        bar.set_postfix_str(" · ".join(parts))
    return show


def _provenance(ev: _Evaluation) -> Dict[str, Any]:
    from .. import __version__
    model = ev.model
    attacks = {}
    if ev.results:
        for a in ev.results[0].attacks:
            attacks[a.key] = {"name": a.describe.get("name"), "implementation": a.describe.get("implementation"),
                              "spec": a.spec, "view": a.view, "kind": a.kind}
    return {
        "versions": {"robustdeq": __version__, "torch": torch.__version__,
                     "torchattacks": _version("torchattacks"), "pyautoattack": _version("pyautoattack"),
                     "numpy": _version("numpy"), "python": sys.version.split()[0]},
        "platform": platform.platform(), "device": str(ev.device),
        "seed": ev.protocol.seed, "threat": ev.norm, "eps": list(ev.protocol.eps), "steps": ev.protocol.steps, "batch_size": ev.protocol.batch_size,
        "alpha_rule": "2.5 * eps / steps", "suite": ev.suite_label, "cascade": ev.protocol.cascade, "attacks": attacks,
        "model": {
            "class": type(model).__name__,
            "config": getattr(model, "robustdeq_config", None),
            "parameters_sha256": ev.config["model"],
            "randomized": bool(getattr(model, "randomized", False)),
            "defense": ({"randomized": getattr(model, "randomized", None),
                         "dynamic": getattr(model, "dynamic", None),
                         "differentiable": getattr(model, "differentiable", None),
                         "views": sorted(ev.views)} if hasattr(model, "adaptive_views") else None),
            "describe": model.describe() if hasattr(model, "describe") and callable(model.describe) else None,
        },
        "data": {"n": int(ev.x.shape[0]), "shape": list(ev.x.shape[1:]), "sha256": ev.config["data"]},
        "checks": ev.run.checks,
        "check_config": _provenance_check_config(ev),
    }


def _provenance_check_config(ev: _Evaluation) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ev.run.check_config).items()}


__all__ = ["evaluate"]
