"""Per-sample worst case over a sequence of attacks.

``WorstCase([PGD(...), StateAttack(...), AutoAttack(...)])`` runs the attacks in order, each on
the samples still robust after the previous ones (AutoAttack's cascade), judged by one model: a
sample is robust when the judge classifies the clean input and every attack's output correctly.
Robust accuracy is therefore that of the per-sample OR of the attacks' successes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .._tensor import verdict_margins
from .base import Attack, check_inputs, check_labels, logits_of, model_mode

logger = logging.getLogger(__name__)


@dataclass
class WorstCaseResult:
    """Outcome of :meth:`WorstCase.run` (all per-sample tensors have shape (B,)).

    - ``x_adv``: the first attack output that broke the sample; for robust samples the output of
      the attacks with the smallest judge margin (the clean input if misclassified clean);
    - ``robust``: correctly classified on the clean input and on every attack's output;
    - ``clean``: correctly classified on the clean input;
    - ``per_attack[name]``: still robust after this attack alone; exact on the samples the attack
      ran on (``attacked[name]``); samples it skipped (already broken) are False, as they are
      not robust anyway (``cascade=False`` runs every attack on every correct sample);
    - ``attacked[name]``: the samples the attack ran on;
    - ``first_success``: per sample, the name of the attack that broke it first, "clean" when
      misclassified without attack, None when robust;
    - ``robust_after``: cumulative robust flags after each attack, in order.
    """

    x_adv: Tensor
    robust: Tensor
    clean: Tensor
    per_attack: Dict[str, Tensor]
    attacked: Dict[str, Tensor]
    first_success: List[Optional[str]]
    robust_after: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        """Fraction of the samples that are ``robust`` (NaN for an empty batch)."""
        return float(self.robust.float().mean()) if self.robust.numel() else float("nan")

    def summary(self) -> Dict[str, Any]:
        """Clean and robust accuracy, cumulative robust accuracy after each attack and the number
        of samples each attack broke first, as a JSON-ready dict."""
        n = max(self.robust.numel(), 1)
        return {"clean_accuracy": float(self.clean.float().sum()) / n,
                "robust_accuracy": float(self.robust.float().sum()) / n,
                "robust_after": {k: float(v.float().sum()) / n for k, v in self.robust_after.items()},
                "successes": {k: sum(1 for s in self.first_success if s == k)
                              for k in self.per_attack}}


def _unique_names(attacks: Sequence[Attack]) -> List[str]:
    names, seen = [], {}
    for a in attacks:
        base = str(getattr(a, "name", type(a).__name__))
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base} #{seen[base]}")
    return names


class WorstCase:
    """Run ``attacks`` in sequence on the samples still robust; keep the per-sample worst case.

    Args:
        attacks: robustdeq :class:`Attack` objects (untargeted), all with the same threat model.
        judge: the model whose logits decide correctness (default ``attacks[0].model``): correct
            where the true class's logit is strictly above every other (a tie is wrong, the
            evaluation's rule, :func:`robustdeq._tensor.correct`).
        cascade: run each attack only on the samples still robust (default); with False every
            attack runs on every clean-correct sample, so ``per_attack`` is exact everywhere.
        batch_size: batch size of the judge's predictions.
    """

    def __init__(self, attacks: Sequence[Attack], *, judge: Optional[nn.Module] = None,
                 cascade: bool = True, batch_size: int = 256):
        attacks = list(attacks)
        if not attacks:
            raise ConfigError("WorstCase needs at least one attack")
        for a in attacks:
            if not callable(a) or not hasattr(a, "model"):
                raise ConfigError(f"not a robustdeq attack: {a!r}")
            if getattr(a, "targeted", False):
                raise ConfigError(f"{a.name}: targeted attacks do not measure robust accuracy; "
                                  "WorstCase takes untargeted attacks")
        models = {(round(a.eps, 12), a.norm) for a in attacks if getattr(a, "eps", None) is not None
                  and getattr(a, "norm", None) in ("Linf", "L2")}
        if len(models) > 1:
            raise ConfigError(f"the attacks use different threat models {sorted(models)}; a worst "
                              "case is only meaningful for one (eps, norm)")
        if judge is not None and not isinstance(judge, nn.Module):
            raise ConfigError(f"judge must be an nn.Module, got {type(judge).__name__}")
        self.attacks = attacks
        self.names = _unique_names(attacks)
        self.judge = judge if judge is not None else attacks[0].model
        self.cascade = bool(cascade)
        self.batch_size = int(batch_size)
        self.name = "WorstCase[" + ", ".join(self.names) + "]"

    def describe(self) -> Dict[str, Any]:
        """The name, cascade flag and each attack's :meth:`~Attack.describe`."""
        return {"name": self.name, "implementation": "robustdeq", "cascade": self.cascade,
                "attacks": [a.describe() for a in self.attacks]}

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.run(x, y).x_adv

    def run(self, x: Tensor, y: Tensor) -> WorstCaseResult:
        """Attack ``x`` (inputs in [0, 1]) with labels ``y``; the per-sample worst case."""
        x = check_inputs(x, self.judge)
        y = check_labels(y, x)
        b = x.shape[0]
        if b == 0:
            empty = torch.zeros(0, dtype=torch.bool, device=x.device)
            return WorstCaseResult(x_adv=x.clone(), robust=empty, clean=empty,
                                   per_attack={n: empty for n in self.names},
                                   attacked={n: empty for n in self.names}, first_success=[],
                                   robust_after={n: empty for n in self.names})
        with model_mode(self.judge, "keep"):  # restore whatever the attacks/judge touch
            logits = logits_of(self.judge, x, self.batch_size)
            m_clean = verdict_margins(logits, y)
            clean = m_clean > 0  # strict margin decides (a tie is wrong, as in the evaluation)
            robust = clean.clone()
            x_adv = x.clone()
            best = torch.where(clean, m_clean, torch.full_like(m_clean, float("-inf")))
            first: List[Optional[str]] = [None if bool(c) else "clean" for c in clean.tolist()]
            per_attack, attacked, after = {}, {}, {}
            for name, atk in zip(self.names, self.attacks):
                todo = (robust if self.cascade else clean).nonzero()[:, 0]
                mask = torch.zeros(b, dtype=torch.bool, device=x.device)
                mask[todo] = True
                attacked[name] = mask
                alone = torch.zeros(b, dtype=torch.bool, device=x.device)
                if todo.numel():
                    xa = atk(x[todo], y[todo])
                    logits = logits_of(self.judge, xa, self.batch_size)
                    m = verdict_margins(logits, y[todo])
                    ok = m > 0
                    alone[todo] = ok
                    newly = todo[~ok & robust[todo]]
                    for i in newly.tolist():
                        first[i] = name
                    # broken samples keep the first breaking x_adv; robust ones the lowest margin
                    take = (~ok & robust[todo]) | (ok & robust[todo] & (m < best[todo]))
                    x_adv[todo[take]] = xa[take]
                    best[todo[take]] = torch.where(ok[take], m[take], torch.full_like(m[take], float("-inf")))
                    robust[todo] = robust[todo] & ok
                per_attack[name] = alone
                after[name] = robust.clone()
                logger.info("%s: robust %d/%d", name, int(robust.sum()), b)
        return WorstCaseResult(x_adv=x_adv, robust=robust, clean=clean, per_attack=per_attack,
                               attacked=attacked, first_success=first, robust_after=after)


__all__ = ["WorstCase", "WorstCaseResult"]
