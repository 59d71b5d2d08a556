"""The smoothing engine: the base classifier (independent or SRS warm-started solves on noisy
inputs), per-input CERTIFY, :func:`certify` and :func:`predict`
(:func:`robustdeq.certify.certify_checkpoint` with ``method="smoothing"`` runs it on a checkpoint).
The rules are stated in :mod:`robustdeq.certify.smoothing`."""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import time
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ...config import SolverConfig, to_dict
from ...deq.noisy import base_logits, run_noisy, to_model_dtype
from ...deq.protocols import SolverModel
from ...errors import ConfigError
from ...guard import preserve_model
from ..._tensor import check_labels
from .config import ABSTAIN, SmoothingConfig, make_config
from .proof import make_proof
from .sequential import SequentialDecision
from .report import SmoothingReport, SmoothingResult, summarize
from .statistics import check_count, clopper_pearson_lower, radius_from, srs_lower_bound

logger = logging.getLogger(__name__)

PROOF_COUNTS = ("proven_warm", "proven_cold", "tightened", "unproven")


class _Base:
    """Evaluates the base classifier on noise batches: independent solves, or (SRS) warm-started
    solves with ``S`` solver steps (a chain of batches, or from the clean input's fixed point).
    Counts the solver's per-sample steps (``f_evals``) and the rows actually passed through the
    cell (``cell_evals``: a batched solve evaluates every row until its last row stops, and a
    read-out may evaluate the cell once more; counted while :meth:`counting` is active)."""

    def __init__(self, model: nn.Module, cfg: SmoothingConfig):
        self.model, self.cfg = model, cfg
        self.deq = isinstance(model, SolverModel)
        if cfg.srs and not self.deq:
            raise ConfigError(f"SRS (srs_steps > 0) needs a DEQ with a fixed-point solver; "
                              f"{type(model).__name__} has none: use srs_steps=0")
        self.f_evals = 0
        self.cell_evals = 0
        self.z: Optional[Tensor] = None       # the chain: previous batch's fixed points
        self.ok: Optional[Tensor] = None
        self.anchor: Optional[Tuple[Tensor, Tensor]] = None   # clean start: (z*(x), ok)
        self.proof = make_proof(model, cfg.srs_check, cfg.clip) if cfg.srs and self.deq else None
        if cfg.srs and cfg.mode != "fixed" and self.proof is None:
            # srs_check="auto" without a proof falls back to the check-based correction, which
            # bounds a fixed number n of samples: in the sequential modes the warm-started counts
            # would be counted uncorrected (they are not draws of the base classifier)
            from .proof import proof_support
            raise ConfigError(f"mode={cfg.mode!r} with warm starts (srs_steps > 0) needs per-sample "
                              f"proofs, and {type(model).__name__} admits none "
                              f"({proof_support(model)[1]}): srs_check={cfg.srs_check!r} would fall back "
                              "to the check-based correction, which applies to mode='fixed' only; use "
                              "mode='fixed' or srs_steps=0")
        self.proof_counts = dict.fromkeys(PROOF_COUNTS, 0)
        if self.deq:
            self.est = model.estimator
            self.rec = sorted(set(self.est.required_record()))
            if cfg.srs:
                base_cfg = getattr(model, "solver_config", None) or SolverConfig()
                self.chain_cfg = base_cfg.replace(max_iter=int(cfg.srs_steps))
                self.chain_rec = [s for s in self.rec if s < cfg.srs_steps]

    def reset(self) -> None:
        self.z = self.ok = self.anchor = None
        self.f_evals = 0
        self.cell_evals = 0
        self.proof_counts = dict.fromkeys(PROOF_COUNTS, 0)

    @contextlib.contextmanager
    def counting(self):
        """Count the rows through ``model.cell`` (a forward hook, removed on exit)."""
        cell = getattr(self.model, "cell", None) if self.deq else None
        if not isinstance(cell, nn.Module):
            yield
            return

        def hook(_mod, inputs, _out):
            t = inputs[0] if inputs else None
            while isinstance(t, (list, tuple)) and t:
                t = t[0]
            if isinstance(t, Tensor) and t.dim() > 0:
                self.cell_evals += int(t.shape[0])
        handle = cell.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _noisy(self, xn: Tensor) -> Tensor:
        return to_model_dtype(self.model, xn.clamp(0.0, 1.0) if self.cfg.clip else xn)

    def full(self, xn: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Independent (from-scratch) predictions ``(pred, z*, ok)`` of the base classifier."""
        if not self.deq:
            logits = base_logits(self.model, xn, clip=self.cfg.clip)
            return _decide(logits), None, None
        eq = run_noisy(self.model, self._noisy(xn))
        self.f_evals += int(eq.stats.steps.sum())
        return _decide(eq.logits), eq.z_star, ~eq.stats.diverged

    def full_batched(self, xn: Tensor) -> Tensor:
        """:meth:`full`'s predictions on ``xn`` in batches of ``batch_size``."""
        out = [self.full(xn[s:s + b])[0] for s, b in _batches(xn.shape[0], self.cfg.batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=xn.device)

    def _warm(self, xn: Tensor, z0: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        # S solver steps from the chain; an estimator whose state is not recorded within S
        # steps reads out the iterate itself
        grad = None if len(self.chain_rec) == len(self.rec) else "none"
        eq = run_noisy(self.model, self._noisy(xn), z0=z0, solver=self.chain_cfg, grad=grad)
        self.f_evals += int(eq.stats.steps.sum())
        return _decide(eq.logits), eq.z_star, ~eq.stats.diverged

    def set_anchor(self, x1: Tensor) -> None:
        """Clean start: solve the clean input ``x1`` (1, ...) from scratch; its fixed point starts
        every warm solve of this input (where it converged and is finite)."""
        _, z, ok = self.full(x1)
        finite = torch.isfinite(z.reshape(1, -1)).all(dim=1)
        self.anchor = (z.detach(), ok & finite)

    def chain(self, xn: Tensor) -> Tuple[Tensor, Tensor]:
        """SRS predictions of one noise batch ``(pred, warm)``; ``warm``: rows warm-started."""
        pred, warm, _ = self._chain(xn)
        return pred, warm

    def proven(self, xn: Tensor) -> Tuple[Tensor, Tensor]:
        """Proven warm starts on one noise batch: ``(pred, warm)`` where ``pred`` is the exact
        equilibrium's class of every row (:mod:`.proof`), or -1 where no proof was found;
        ``warm``: rows whose warm-started iteration was proven.

        Every row iterates ``z <- f(z)`` from its start (the clean input's fixed point, the chain,
        or the model's initial state where there is no finite warm start) with the proof checked
        after each step, and leaves at its first proof; the rows still unproven after
        ``srs_steps`` steps iterate on (counted as ``tightened``) until proven or until the
        contraction has shrunk their distance to ``z*`` below float64 resolution
        (:attr:`~.proof.EquilibriumClassProof.max_steps`); what is still unproven then (a near tie
        at the equilibrium) gets no class."""
        b = xn.shape[0]
        z0, warm = self._start(xn)
        cls, ok, steps, z = self.proof.iterate(self._noisy(xn), z0, self.cfg.srs_steps)
        n_steps = int(steps.sum())
        self.f_evals += n_steps
        self.cell_evals += n_steps
        pc = self.proof_counts
        pc["proven_warm"] += int((ok & warm).sum())
        pc["proven_cold"] += int((ok & ~warm).sum())
        out = torch.where(ok, cls, torch.full_like(cls, ABSTAIN))
        left = (~ok).nonzero().flatten()
        if left.numel():
            c2, ok2, st2, z2 = self.proof.iterate(self._noisy(xn[left]), z[left], self.proof.max_steps)
            n2 = int(st2.sum())
            self.f_evals += n2
            self.cell_evals += n2
            out[left] = torch.where(ok2, c2, torch.full_like(c2, ABSTAIN))
            z[left] = z2
            pc["tightened"] += int(left.numel())
            pc["proven_cold"] += int(ok2.sum())
        z = z.to(z0.dtype)
        pc["unproven"] += int((out == ABSTAIN).sum())
        if self.anchor is None:            # the chain: the next batch starts from these states
            self.z = z.detach()
            self.ok = torch.isfinite(z.reshape(b, -1)).all(dim=1)
        return out, ok & warm

    def _start(self, xn: Tensor) -> Tuple[Tensor, Tensor]:
        """``(z0, warm)``: each row's start (the clean input's fixed point, or the previous
        batch's states, where finite; else the model's initial state) and whether it is warm."""
        from ...deq.warm import initial_state_fn, warm_start_rows
        b = xn.shape[0]
        init = initial_state_fn(self.model, self._noisy(xn))
        start = None
        if self.anchor is not None:
            za, oka = self.anchor
            start = warm_start_rows(za.expand((b,) + tuple(za.shape[1:])), oka.expand(b), init, b)
        elif self.z is not None:
            idx = torch.arange(b, device=self.z.device) % self.z.shape[0]
            start = warm_start_rows(self.z[idx], self.ok[idx], init, b)
        if start is None:
            return init(), torch.zeros(b, dtype=torch.bool, device=xn.device)
        return start

    def _chain(self, xn: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`chain` with the states ``z`` of the rows."""
        from ...deq.warm import initial_state_fn, warm_start_rows
        b = xn.shape[0]
        start = None
        if self.anchor is not None:
            za, oka = self.anchor
            start = warm_start_rows(za.expand((b,) + tuple(za.shape[1:])), oka.expand(b),
                                    initial_state_fn(self.model, self._noisy(xn)), b)
        elif self.z is not None:
            idx = torch.arange(b, device=self.z.device) % self.z.shape[0]
            start = warm_start_rows(self.z[idx], self.ok[idx], initial_state_fn(self.model, self._noisy(xn)), b)
        if start is None:
            pred, z, ok = self.full(xn)
            warm = torch.zeros(b, dtype=torch.bool, device=xn.device)
        else:
            z0, warm = start
            pred = torch.empty(b, dtype=torch.long, device=xn.device)
            z = torch.empty(z0.shape, dtype=z0.dtype, device=z0.device)
            ok = torch.empty(b, dtype=torch.bool, device=xn.device)
            if bool(warm.all()):
                pred, zw, ok = self._warm(xn, z0.contiguous())
                z = zw.reshape(z.shape)
            else:
                wi, ci = warm.nonzero().flatten(), (~warm).nonzero().flatten()
                pw, zw, okw = self._warm(xn[wi], z0[wi])
                pred[wi], z[wi], ok[wi] = pw, zw.reshape(z[wi].shape), okw
                if ci.numel():
                    pc, zc, okc = self.full(xn[ci])
                    pred[ci], z[ci], ok[ci] = pc, zc.reshape(z[ci].shape), okc
        if self.anchor is None:
            finite = torch.isfinite(z.reshape(b, -1)).all(dim=1)
            self.z, self.ok = z.detach(), (ok & finite)
        return pred, warm, z


def _derive_seed(seed: int, tag: str, index: int) -> int:
    h = hashlib.sha256(f"robustdeq.smoothing:{seed}:{tag}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _check_x(model: nn.Module, x: Any) -> Tensor:
    from ...data import validate_inputs
    return validate_inputs(x, expected_shape=getattr(model, "input_shape", None)).detach()


def _check_y(y: Optional[Tensor], n: int) -> Optional[Tensor]:
    check_labels(y, n)
    return y


def _noise(gen: torch.Generator, b: int, x1: Tensor, sigma: float) -> Tensor:
    e = torch.randn((b,) + tuple(x1.shape[1:]), generator=gen, dtype=x1.dtype).to(x1.device)
    return x1 + sigma * e


def _batches(total: int, size: int):
    done = 0
    while done < total:
        b = min(size, total - done)
        yield done, b
        done += b


def _decide(logits: Tensor) -> Tensor:
    """The base classifier's class per row; -1 (no class: counted for none, so never certified)
    where the logits are not all finite (NaN logits would otherwise read as class 0)."""
    pred = logits.argmax(dim=1)
    return torch.where(torch.isfinite(logits).all(dim=1), pred, torch.full_like(pred, -1))


def _count(pred: Tensor, counts: Optional[Tensor]) -> Tensor:
    pred = pred.cpu()
    c = torch.bincount(pred[pred >= 0], minlength=1)   # -1: no proven class / non-finite logits
    if counts is None:
        return c
    m = max(c.numel(), counts.numel())
    out = torch.zeros(m, dtype=torch.long)
    out[:counts.numel()] += counts
    out[:c.numel()] += c
    return out


def _resolve_from_scratch(base: _Base, x1: Tensor, cfg: SmoothingConfig, states: list, need: Tensor,
                          out: Tensor) -> None:
    """``out[i] =`` the base classifier's prediction on the noise of position ``i`` for every
    ``need[i]``, re-drawing each batch's noise from its saved generator state; the rows are solved
    in batches of ``batch_size``."""
    g = torch.Generator()
    rows: List[Tensor] = []
    where: List[Tensor] = []
    pending = 0

    def flush() -> None:
        nonlocal rows, where, pending
        if pending:
            out[torch.cat(where)] = base.full_batched(torch.cat(rows)).cpu()
        rows, where, pending = [], [], 0
    for start, b, state in states:
        m = need[start:start + b]
        if not bool(m.any()):
            continue
        g.set_state(state)
        xn = _noise(g, b, x1, cfg.sigma)
        rows.append(xn[m.to(xn.device)])
        where.append(m.nonzero().flatten() + start)
        pending += int(m.sum())
        if pending >= cfg.batch_size:
            flush()
    flush()


def _certify_one(base: _Base, x1: Tensor, index: int, cfg: SmoothingConfig) -> Tuple[int, float, float, int, int, dict]:
    """CERTIFY (and SRS) for one input ``x1`` (1, ...)."""
    base.reset()
    gen = torch.Generator().manual_seed(_derive_seed(cfg.seed, "noise", index))
    if base.proof is not None:
        sample = base.proven
    else:
        sample = base.chain if cfg.srs else (lambda xn: (base.full(xn)[0], None))
    if cfg.srs and cfg.srs_start == "clean":
        base.set_anchor(x1)
    counts0 = None
    selection = list(_batches(cfg.n0, cfg.batch_size))
    # sequential modes without warm starts: the last selection batch and the first estimation
    # batch are drawn in that order (the same noise as two solves) and solved together, one
    # batched solve instead of two small ones. The base classifier's prediction of a row does not
    # depend on the other rows of its batch (a DEQ's solver stops and freezes each row on its
    # own), so the predictions -- and the selection's independence of the estimation samples --
    # are those of separate solves.
    first_b = min(cfg.first_batch, cfg.batch_size, cfg.n)
    merge = cfg.mode != "fixed" and not cfg.srs and selection[-1][1] + first_b <= cfg.batch_size
    first = None
    for j, (_, b) in enumerate(selection):
        xn = _noise(gen, b, x1, cfg.sigma)
        if merge and j == len(selection) - 1:
            pred = sample(torch.cat([xn, _noise(gen, first_b, x1, cfg.sigma)]))[0]
            pred, first = pred[:b], pred[b:]
        else:
            pred = sample(xn)[0]
        counts0 = _count(pred, counts0)
    c_hat = int(counts0.argmax())
    if cfg.mode != "fixed":
        return _certify_sequential(base, sample, gen, x1, c_hat, cfg, first)
    if not cfg.srs or base.proof is not None:
        n_a = 0
        for _, b in _batches(cfg.n, cfg.batch_size):
            n_a += int((sample(_noise(gen, b, x1, cfg.sigma))[0] == c_hat).sum())
        p_lower = clopper_pearson_lower(n_a, cfg.n, cfg.alpha)
        extra = {"proof": dict(base.proof_counts)} if base.proof is not None else {}
        return (c_hat if p_lower > 0.5 else ABSTAIN), radius_from(p_lower, cfg.sigma), p_lower, n_a, c_hat, extra
    # SRS. The checked positions are the first K of a random permutation drawn independently of
    # the noise; K is cfg.check_samples, or (check_max) a function of the warm-started count only.
    # After the warm pass the noise of the checked positions is drawn again (from the generator
    # state saved before each batch) and solved from scratch in full batches: the same
    # predictions as solving it within the warm pass, in memory of one batch.
    cgen = torch.Generator().manual_seed(_derive_seed(cfg.seed, "check", index))
    perm = torch.randperm(cfg.n, generator=cgen)
    preds = torch.empty(cfg.n, dtype=torch.long)
    warms = torch.empty(cfg.n, dtype=torch.bool)
    states = []
    n_a = 0
    for start, b in _batches(cfg.n, cfg.batch_size):
        states.append((start, b, gen.get_state()))
        pred, warm = sample(_noise(gen, b, x1, cfg.sigma))
        n_a += int((pred == c_hat).sum())
        preds[start:start + b], warms[start:start + b] = pred.cpu(), warm.cpu()
    k = cfg.check_samples
    if cfg.check_max:
        k = check_count(n_a, cfg.n, cfg.alpha, cfg.check_samples, cfg.check_max,
                        cfg.check_alpha_fraction, cfg.check_slack)
    pos = perm[:k]
    srs_pred = preds[pos]
    std = preds.clone()                  # cold rows: the warm pass IS the base classifier there
    need = torch.zeros(cfg.n, dtype=torch.bool)
    need[pos] = True
    need &= warms
    _resolve_from_scratch(base, x1, cfg, states, need, std)
    std = std[pos]
    hit_srs, hit_std = srs_pred == c_hat, std == c_hat
    disagree = int((hit_srs & ~hit_std).sum())
    agree = int((hit_srs & hit_std).sum())
    gained = int((~hit_srs & hit_std).sum())
    p_unc = clopper_pearson_lower(n_a, cfg.n, cfg.alpha)
    p_lower, d_up = srs_lower_bound(n_a, cfg.n, k, disagree, agree, cfg.alpha, cfg.check_alpha_fraction,
                                    gained=gained)
    extra = {"checked": k, "disagree": disagree, "agree": agree, "gained": gained, "d_upper": d_up,
             "p_lower_uncorrected": p_unc, "radius_uncorrected": radius_from(p_unc, cfg.sigma),
             "warm_fraction": int(warms.sum()) / cfg.n}
    radius = radius_from(p_lower, cfg.sigma)
    return (c_hat if p_lower > 0.5 else ABSTAIN), radius, p_lower, n_a, c_hat, extra


def _certify_sequential(base: _Base, sample, gen: torch.Generator, x1: Tensor, c_hat: int,
                        cfg: SmoothingConfig, first: Optional[Tensor] = None) -> Tuple[int, float, float, int, int, dict]:
    """The sequential modes for one input after the selection (:mod:`.sequential`): estimation
    batches of ``first_batch`` doubling up to ``batch_size``, until the decisions are made or the
    budget ``n`` is spent. ``first``: the first batch's predictions where they were solved with
    the selection (the next draws of ``gen`` after the selection's)."""
    test = SequentialDecision(cfg.sigma, cfg.radii, cfg.alpha, cfg.futility_alpha, cfg.n, cfg.mode,
                              cfg.tolerance, futility=cfg.futility_rule,
                              final_alpha_fraction=cfg.final_alpha_fraction)
    size = min(cfg.first_batch, cfg.batch_size)
    while not test.stopped:
        b = min(size, cfg.n - test.samples)
        if first is not None:
            pred, first = first, None
            if pred.shape[0] != b:
                raise RuntimeError(f"first estimation batch of {pred.shape[0]} rows, expected {b}")
        else:
            pred = sample(_noise(gen, b, x1, cfg.sigma))[0]
        hits = int((pred == c_hat).sum())
        test.update(hits, b - hits)
        size = min(2 * size, cfg.batch_size)
    test.finish()
    extra = {"samples": test.samples, "decisions": test.decision_dict() if cfg.mode == "sequential" else None}
    if base.proof is not None:
        extra["proof"] = dict(base.proof_counts)
    radius = test.radius
    certified = radius > 0 or any(d == "certified" for d in test.decisions.values())
    return (c_hat if certified else ABSTAIN), radius, test.p_lower, test.successes, c_hat, extra


def _model_info(model: nn.Module) -> dict:
    cfg = getattr(model, "robustdeq_config", None) or {}
    sc = getattr(model, "solver_config", None)
    return {"name": cfg.get("name"), "options": cfg.get("options"), "class": type(model).__name__,
            "solver": to_dict(sc) if sc is not None else None}


def certify(model: nn.Module, x: Tensor, y: Optional[Tensor] = None,
            config: Union[SmoothingConfig, Mapping[str, Any], None] = None, *,
            progress: bool = False, partial=None, **options) -> SmoothingReport:
    """Certify the Gaussian-smoothed ``model`` at every input of ``x`` (CERTIFY; SRS when
    ``srs_steps > 0``). See the module docstring for the exact rule.

    Args:
        model: any ``x -> logits`` module (DEQs: their own solver; SRS needs a DEQ). Not modified.
        x: (N, ...) inputs in [0, 1]; y: (N,) labels or None.
        config: a :class:`SmoothingConfig` or mapping; ``options`` override its fields
            (``sigma=0.5, n=1000, srs_steps=3``).
        progress: tqdm progress bar over the inputs.
        partial: a :class:`~robustdeq.certify.smoothing.resume.PartialResults` (in a process
            group, this rank's): its results are reused and each new one is added to it as soon as
            it is computed; in a group no rank certifies an input that any rank's file holds.
    Returns:
        :class:`SmoothingReport` (one :class:`SmoothingResult` per input).

    Inside a process group (``torchrun``; :mod:`robustdeq.distributed`) the inputs are shared out
    over the ranks and every rank returns the whole report, equal to the single-process one input
    for input (the noise of an input depends only on ``seed`` and its index);
    :func:`robustdeq.certify.certify_checkpoint` writes it on rank 0 only.
    """
    cfg = make_config(config, **options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module mapping x -> logits, got {type(model).__name__}")
    x = _check_x(model, x)
    y = _check_y(y, x.shape[0])
    from ...checkpoint import require_finite
    require_finite(model, "the model to certify")
    from ...distributed import check_agreement, context as dist_context
    ctx = dist_context()
    check_agreement({**to_dict(cfg), "inputs": list(x.shape)}, "certify (smoothing)", ctx)
    base = _Base(model, cfg)
    results: List[SmoothingResult] = []
    t_all = time.perf_counter()
    with preserve_model(model, "eval", values=True, who="smoothing"), torch.no_grad(), base.counting():
        def one(i: int) -> SmoothingResult:
            r = certify_input(i)
            if partial is not None:
                partial.add(r)
            return r

        def certify_input(i: int) -> SmoothingResult:
            t0 = time.perf_counter()
            pred, radius, p_lower, n_a, c_hat, extra = _certify_one(base, x[i:i + 1], i, cfg)
            seconds = time.perf_counter() - t0
            label = int(y[i]) if y is not None else None
            n = int(extra.pop("samples", cfg.n))
            decisions = extra.pop("decisions", None)
            proof = extra.pop("proof", None)
            f_evals = base.f_evals / (cfg.n0 + n) if base.deq else None
            cell_evals = base.cell_evals / (cfg.n0 + n) if base.deq else None
            logger.debug("input %d: prediction %s radius %.4f (p_lower %.4f, %d/%d) in %.3f s", i,
                         "abstain" if pred == ABSTAIN else pred, radius, p_lower, n_a, n, seconds)
            return SmoothingResult(
                index=i, label=label, prediction=pred, radius=radius, p_lower=p_lower, count=n_a, n=n,
                selected=c_hat, correct=(pred == label) if label is not None else None, seconds=seconds,
                f_evals=f_evals, srs=extra or None, cell_evals=cell_evals, decisions=decisions, proof=proof,
                samples=cfg.n0 + n)
        results = _per_input(x.shape[0], one, ctx, "certify (smoothing)" if progress else None,
                             done=partial.done if partial is not None else None)
    from ... import __version__
    prov = {"robustdeq": __version__, "torch": torch.__version__, "total_s": time.perf_counter() - t_all,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    config = {**to_dict(cfg), "futility": cfg.futility_rule}   # the rule in force, not None
    return SmoothingReport(config=config, results=results, summary=summarize(results, cfg.radii),
                           model=_model_info(model), provenance=prov)


def predict(model: nn.Module, x: Tensor, config: Union[SmoothingConfig, Mapping[str, Any], None] = None,
            **options) -> Tensor:
    """PREDICT of Cohen et al.: (N,) classes of the smoothed classifier, ABSTAIN (-1) where the
    top two counts of ``n`` independent samples do not differ significantly at level ``alpha``.
    Uses independent solves (SRS has no correlation-corrected PREDICT: ``srs_steps`` must be 0).
    Sharded over the ranks of a process group as :func:`certify` is."""
    from scipy.stats import binomtest
    cfg = make_config(config, **options)
    if cfg.srs:
        raise ConfigError("predict has no correlation-corrected SRS variant; use srs_steps=0 "
                          "(SRS applies to certify)")
    x = _check_x(model, x)
    from ...checkpoint import require_finite
    require_finite(model, "the model to smooth")
    base = _Base(model, cfg)
    from ...distributed import context as dist_context
    ctx = dist_context()
    with preserve_model(model, "eval", values=True, who="smoothing"), torch.no_grad():
        def one(i: int) -> int:
            gen = torch.Generator().manual_seed(_derive_seed(cfg.seed, "predict", i))
            counts = None
            for _, b in _batches(cfg.n, cfg.batch_size):
                counts = _count(base.full(_noise(gen, b, x[i:i + 1], cfg.sigma))[0], counts)
            if counts.numel() < 2:
                counts = torch.cat([counts, torch.zeros(2 - counts.numel(), dtype=torch.long)])
            top = torch.topk(counts, 2)
            n1, n2 = int(top.values[0]), int(top.values[1])
            p = binomtest(n1, n1 + n2, 0.5).pvalue if n1 + n2 > 0 else 1.0
            return int(top.indices[0]) if p <= cfg.alpha else ABSTAIN
        out = _per_input(x.shape[0], one, ctx, None)
    return torch.tensor(out, dtype=torch.long, device=x.device)


def _per_input(n: int, one, ctx, desc: Optional[str], done: Optional[Mapping[int, Any]] = None) -> list:
    """``[one(i) for i in range(n)]``, where ``done`` (input index -> result, e.g. read back from
    a partial file) gives the results it holds instead. Inside a process group (``torchrun``;
    :mod:`robustdeq.distributed`) the ranks first share which inputs their ``done`` hold (none of
    them is computed again), the other inputs are shared out over the ranks (each claims the next
    input as it becomes free) and every rank returns the whole list: the noise of input ``i`` is
    drawn from seeds derived from ``i`` alone, so the list does not depend on the sharding. A
    failure on any rank is raised on every rank."""
    from ...distributed import all_gather_object, claim, gather_sharded
    kept = dict(done or {})
    finished = set(kept)
    if ctx is not None:  # every rank calls it (also with nothing kept), before the claims
        finished = set().union(*(set(keys) for keys in all_gather_object(sorted(kept))))
    todo = [i for i in range(n) if i not in finished]
    bar = None
    if desc is not None and (ctx is None or ctx.is_main):
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=desc, unit="input")
        bar.update(n - len(todo))
    done_now: list = list(kept.items())
    failure: Optional[BaseException] = None
    try:
        for k in claim(range(len(todo)), ctx):
            i = todo[k]
            done_now.append((i, one(i)))
            if bar is not None:  # in a group: the inputs claimed so far by all ranks
                bar.update(max(0, n - len(todo) + k + 1 - bar.n))
    except Exception as e:
        if ctx is None:
            raise
        failure = e  # raised on every rank by gather_sharded
    finally:
        if bar is not None:
            bar.close()
    if ctx is not None:
        logger.debug("rank %d of %d: %d of %d inputs", ctx.rank, ctx.world_size, len(done_now), n)
        done_now = gather_sharded(done_now, failure, ctx)
    by_index = dict(done_now)  # an input two ranks' files both hold counts once
    return [by_index[i] for i in sorted(by_index)]
