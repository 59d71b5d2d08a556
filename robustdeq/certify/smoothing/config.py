"""Settings of randomized-smoothing certification (:class:`SmoothingConfig`) and its constants."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from ...config import check_radii, from_dict, to_dict
from ...errors import ConfigError

ABSTAIN = -1
SCHEMA = "robustdeq.certify.smoothing/1"
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
PLOT_FILE = "certified_accuracy.png"
SRS_STARTS = ("chain", "clean")
MODES = ("fixed", "sequential", "radius")
SRS_CHECKS = ("sample", "proof", "auto")
FUTILITY_RULES = ("sequence", "projected")


@dataclass(frozen=True)
class SmoothingConfig:
    """Settings of :func:`certify` / :func:`predict`. A field set away from its default where the
    other settings leave it without effect (an SRS field without ``srs_steps``, a sequential field
    in fixed mode, ...) is a :class:`~robustdeq.errors.ConfigError`, not ignored.

    Attributes:
        sigma: standard deviation of the Gaussian noise (> 0).
        n0: selection samples (CERTIFY). n: estimation samples (CERTIFY) / samples (PREDICT).
        alpha: failure probability in (0, 1).
        batch_size: noise samples solved together (the SRS serialisation unit).
        srs_steps: 0 for independent solves; S > 0 for SRS with S solver steps per warm batch
            (with ``srs_check="proof"``: the fixed-point steps, each followed by the proof, after
            which a still unproven sample is reported as solved on; it keeps iterating).
        check_samples: K, estimation samples also solved from scratch (SRS only, 1..n).
        check_alpha_fraction: share of alpha spent on the agreement bound (SRS only, in (0, 1)).
        srs_start: where the warm-started solves start (SRS only): ``"chain"`` (the paper's rule:
            each batch from the previous batch's fixed points, solved in sequence) or ``"clean"``
            (every noise sample from the fixed point of the clean input; no sequence, so any
            batch size, and the start is closer to the noisy fixed points).
        check_max: 0 (default) checks exactly ``check_samples`` positions; > ``check_samples``
            (at most n) chooses the number of checked positions per input in
            [check_samples, check_max] from the warm-started count alone (``check_count``).
        check_slack: the radius (in units of sigma) that the adaptive check count is sized to lose
            at most when the check finds no disagreement (``check_max > 0`` only).
        srs_check: how warm-started predictions are made to count (SRS only): ``"sample"`` (the
            check-based correction: ``check_samples`` random positions re-solved from scratch and
            a hypergeometric bound), ``"proof"`` (a per-sample proof from the cell's contraction
            certificate, checked after every warm-started fixed-point step, that the iterate has
            the exact equilibrium's class; needs a certified contractive cell and an affine
            read-out), or ``"auto"`` (``"proof"`` where the model admits it, else ``"sample"``;
            the sequential modes, which cannot use ``"sample"``, refuse a model without the proof).
        clip: smooth ``f(clip(x + e, 0, 1))`` instead of ``f(x + e)``.
        radii: L2 radii at which the report gives certified accuracy; in ``mode="sequential"``
            the radii decided per input.
        mode: ``"fixed"`` (Cohen et al.'s CERTIFY with ``n`` estimation samples),
            ``"sequential"`` (decide "certified at r" for every r in ``radii`` with an
            anytime-valid confidence sequence, stopping when all are decided or ``n`` samples,
            the budget, are spent) or ``"radius"`` (the largest certified radius, stopping when
            it cannot grow by more than ``tolerance`` within the budget ``n``).
        first_batch: sequential modes: the first estimation batch; later batches double up to
            ``batch_size``.
        futility_alpha: sequential modes: the level of the upper confidence sequence that stops
            a radius as "not certified" early (an error there only loses a certificate).
        futility: sequential mode: when a radius is given up early. ``"sequence"`` (the upper
            confidence sequence at level ``futility_alpha`` falls below ``Phi(r / sigma)``, or the
            radius is out of reach even if every remaining sample succeeded) or ``"projected"``
            (besides those: the radius would stay uncertified at the end of the budget even if the
            success rate of every remaining sample were that upper confidence limit). Either only
            ever withholds a certificate. Left at None: ``"projected"`` in sequential mode (it
            stops inputs whose ``p_A`` lies just below a threshold long before the budget),
            ``"sequence"`` in the other modes, where ``"projected"`` does not apply.
        tolerance: radius mode: the L2 radius growth below which sampling stops.
        final_alpha_fraction: sequential modes: the share ``phi`` in [0, 1) of ``alpha`` spent on
            one Clopper-Pearson test (Cohen et al. 2019) at exactly ``n`` samples, the budget; the
            confidence sequence runs at ``(1 - phi) alpha``. An input still undecided at the budget
            certifies a radius when either test does; valid at ``alpha`` by the union bound,
            because the final test's sample size is fixed in advance. 0 turns it off.
        seed: base seed of the noise (per image: derived from seed and the image index).
    """

    sigma: float = 0.25
    n0: int = 100
    n: int = 10000
    alpha: float = 0.001
    batch_size: int = 400
    srs_steps: int = 0
    check_samples: int = 400
    check_alpha_fraction: float = 0.5
    srs_start: str = "chain"
    check_max: int = 0
    check_slack: float = 0.1
    srs_check: str = "sample"
    clip: bool = False
    radii: Tuple[float, ...] = DEFAULT_RADII
    seed: int = 0
    mode: str = "fixed"
    first_batch: int = 100
    futility_alpha: float = 0.01
    futility: Optional[str] = None
    tolerance: float = 0.05
    final_alpha_fraction: float = 0.25

    def __post_init__(self):
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"SmoothingConfig.sigma must be a finite number > 0, got {self.sigma!r}")
        for name, low in (("n0", 1), ("n", 1), ("batch_size", 1), ("srs_steps", 0), ("seed", 0),
                          ("check_samples", 0), ("check_max", 0), ("first_batch", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"SmoothingConfig.{name} must be an int >= {low}, got {v!r}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"SmoothingConfig.alpha must be in (0, 1), got {self.alpha!r}")
        if not 0 < self.check_alpha_fraction < 1:
            raise ConfigError("SmoothingConfig.check_alpha_fraction must be in (0, 1), got "
                              f"{self.check_alpha_fraction!r}")
        for name, choices in (("mode", MODES), ("srs_check", SRS_CHECKS), ("futility", FUTILITY_RULES)):
            if name == "futility" and self.futility is None:
                continue
            if getattr(self, name) not in choices:
                raise ConfigError(f"SmoothingConfig.{name} must be one of {', '.join(choices)}, got "
                                  f"{getattr(self, name)!r}")
        if not 0 < self.futility_alpha < 1:
            raise ConfigError(f"SmoothingConfig.futility_alpha must be in (0, 1), got {self.futility_alpha!r}")
        if self.futility == "projected" and self.mode != "sequential":
            raise ConfigError(f"SmoothingConfig.futility='projected' applies to mode='sequential' only, got "
                              f"mode={self.mode!r} (radius mode stops by its tolerance)")
        if isinstance(self.final_alpha_fraction, bool) or not isinstance(self.final_alpha_fraction, (int, float)) \
                or not 0 <= self.final_alpha_fraction < 1:
            raise ConfigError("SmoothingConfig.final_alpha_fraction must be a number in [0, 1) (0: no final "
                              f"fixed-n test), got {self.final_alpha_fraction!r}")
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ConfigError(f"SmoothingConfig.tolerance must be a finite number > 0, got {self.tolerance!r}")
        if self.mode != "fixed" and self.srs_steps > 0 and self.srs_check == "sample":
            raise ConfigError(f"SmoothingConfig: mode={self.mode!r} with warm starts (srs_steps > 0) needs "
                              "srs_check='proof' (or 'auto'): the check-based correction bounds a fixed "
                              "number n of samples, not a sequence")
        if self.srs_steps > 0 and self.srs_check != "proof" and not 1 <= self.check_samples <= self.n:
            raise ConfigError(f"SmoothingConfig.check_samples must be in [1, n={self.n}] with SRS "
                              f"(srs_steps > 0): without checked samples the warm-started counts carry "
                              f"no evidence about the base classifier; got {self.check_samples}")
        if self.srs_start not in SRS_STARTS:
            raise ConfigError(f"SmoothingConfig.srs_start must be one of {', '.join(SRS_STARTS)}, got "
                              f"{self.srs_start!r}")
        if self.check_max and not self.check_samples <= self.check_max <= self.n:
            raise ConfigError(f"SmoothingConfig.check_max must be 0 (a fixed number of checked samples) or "
                              f"in [check_samples={self.check_samples}, n={self.n}], got {self.check_max}")
        if not (math.isfinite(self.check_slack) and self.check_slack > 0):
            raise ConfigError(f"SmoothingConfig.check_slack must be a finite number > 0, got {self.check_slack!r}")
        radii = check_radii(self.radii, "SmoothingConfig.radii", required=True)
        object.__setattr__(self, "radii", tuple(sorted(set(radii))))
        idle = self._inapplicable()
        if idle:
            raise ConfigError("SmoothingConfig: " + "; ".join(
                f"{name}={getattr(self, name)!r} has no effect {why}" for name, why in idle))

    def _inapplicable(self) -> list:
        """(field, why) for each field set away from its default where the other settings leave
        it without effect: refused rather than silently ignored."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        rules = []
        if self.srs_steps == 0:
            rules += [(n, "without SRS (srs_steps=0)") for n in
                      ("check_samples", "check_alpha_fraction", "srs_start", "check_max", "check_slack",
                       "srs_check")]
        else:
            if self.srs_check == "proof":
                rules += [(n, "with srs_check='proof' (no re-solved checks)") for n in
                          ("check_samples", "check_alpha_fraction", "check_max", "check_slack")]
            if self.check_max == 0:
                rules.append(("check_slack", "without check_max"))
        if self.mode == "fixed":
            rules += [(n, "in mode='fixed' (sequential and radius modes only)") for n in
                      ("first_batch", "futility_alpha", "futility", "tolerance", "final_alpha_fraction")]
        elif self.mode == "sequential":
            rules.append(("tolerance", "in mode='sequential' (radius mode only)"))
        seen, idle = set(), []
        for name, why in rules:
            if name not in seen and getattr(self, name) != defaults[name]:
                seen.add(name)
                idle.append((name, why))
        return idle

    @property
    def futility_rule(self) -> str:
        """The futility rule in force: ``futility``, or the mode's default when it is None."""
        if self.futility is not None:
            return self.futility
        return "projected" if self.mode == "sequential" else "sequence"

    @property
    def srs(self) -> bool:
        """Whether serialized randomized smoothing is on (``srs_steps > 0``)."""
        return self.srs_steps > 0

    def replace(self, **changes) -> "SmoothingConfig":
        """A copy with the fields ``changes`` replaced, checked again (unknown fields and bad or
        inapplicable values are a ``ConfigError``)."""
        return make_config({**to_dict(self), **changes})


def make_config(config: Union[SmoothingConfig, Mapping[str, Any], None] = None, **options) -> SmoothingConfig:
    """A :class:`SmoothingConfig` from an instance or a mapping, with ``options`` overriding;
    unknown keys raise :class:`ConfigError`."""
    if isinstance(config, SmoothingConfig):
        base = to_dict(config)
    elif config is None:
        base = {}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"smoothing config must be a SmoothingConfig or a mapping, got {type(config).__name__}")
    return from_dict(SmoothingConfig, {**base, **options})
