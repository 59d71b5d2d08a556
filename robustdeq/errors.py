"""Exceptions and warning classes used across robustdeq.

Errors name the problem (which option, which shape, which file); warnings that matter for trust in
a result (non-convergence of a solver, gradient masking) have dedicated classes so that users can
filter or escalate them (``warnings.simplefilter("error", NonConvergenceWarning)``).
"""
from __future__ import annotations


class RobustDEQError(Exception):
    """Base class of every error raised by robustdeq."""


class ConfigError(RobustDEQError, ValueError):
    """An option is unknown, has the wrong type or an invalid value."""


def reject_unknown(given, known, what: str) -> None:
    """Raise a :class:`ConfigError` naming the keys of ``given`` that are not in ``known`` (and the
    known ones), e.g. ``unknown option(s) for model 'mdeq': widht; known options: width, ...``;
    ``what`` says whose options they are. Every "unknown option" check of the package uses it."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) for {what}: {', '.join(map(str, unknown))}; "
                          f"known options: {', '.join(sorted(map(str, known))) or 'none'}")


class InputError(RobustDEQError, ValueError):
    """An input tensor has the wrong shape, non-finite values or values outside [0, 1]."""


class NoInputGradientError(InputError):
    """The model's logits do not depend on its input under autograd, so gradient-based attacks
    cannot run (raised before attacking; see :func:`robustdeq.attacks.base.check_input_gradient`)."""


class CheckpointError(RobustDEQError):
    """A checkpoint is missing, corrupted, foreign or unsafe to load."""


class TrainingError(RobustDEQError):
    """A training run cannot go on (non-finite loss, no client update fused, ...)."""


class DataError(RobustDEQError):
    """A dataset cannot be found or read."""


class RobustDEQWarning(UserWarning):
    """Base class of robustdeq's warnings."""


class NonConvergenceWarning(RobustDEQWarning):
    """A fixed-point solve did not reach its tolerance (or diverged) for some samples."""


class GradientMaskingWarning(RobustDEQWarning):
    """An evaluation check found a symptom of gradient masking or obfuscation."""


class CertificationWarning(RobustDEQWarning):
    """A certificate could not be established or rests on a loose assumption."""


class CertificateSoundnessWarning(CertificationWarning):
    """A sample certified at some radius was broken by an attack within that radius."""


__all__ = [
    "RobustDEQError", "ConfigError", "reject_unknown", "InputError", "NoInputGradientError", "CheckpointError", "DataError",
    "RobustDEQWarning", "NonConvergenceWarning", "GradientMaskingWarning", "CertificationWarning",
    "CertificateSoundnessWarning",
]
