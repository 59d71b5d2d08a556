"""Wrapping a model in a registered inference-time defense by name (:data:`robustdeq.registry.WRAPPERS`)."""
from __future__ import annotations

import inspect
import json
from typing import Any, Mapping, Optional

from ..errors import ConfigError, reject_unknown


def wrap(model: Any, name: str = "none", options: Optional[Mapping[str, Any]] = None, *,
         what: Optional[str] = None):
    """``model`` wrapped in the inference-time defense registered as ``name`` (see
    :func:`robustdeq.defenses.register_wrapper`), built with ``options`` and put in eval mode;
    ``"none"`` returns ``model`` unchanged. An unknown name, an option the defense's constructor
    does not take, an option it rejects, or options given with ``"none"`` are a
    :class:`~robustdeq.errors.ConfigError`; ``what`` says whose options they are in its message
    (default: the defense's name)."""
    from ..registry import WRAPPERS
    options = dict(options or {})
    defense = WRAPPERS.get(name)  # a ConfigError naming the known defenses
    what = what or f"the inference-time defense {name!r}"
    if defense is not None:
        known = [k for k in inspect.signature(defense.__init__).parameters if k not in ("self", "model")]
        reject_unknown(options, known, what)
        try:
            return defense(model, **options).eval()
        except (TypeError, ValueError) as e:  # ConfigError is a ValueError
            raise ConfigError(f"{what}: options {json.dumps(options)}: {e}") from None
    if options:
        raise ConfigError(f"options {json.dumps(options)} given for {what}: choose a defense "
                          f"({', '.join(w for w in WRAPPERS if w != 'none')}) or drop the options")
    return model


__all__ = ["wrap"]
