"""Tensor helpers shared by attacks, defenses, certificates and evaluation (one copy each).

- the eps ball: :func:`ball_factor` (the L2 rescaling factor), :func:`clip_delta` (a perturbation
  into the ball), :func:`project_ball` (a point into ``B_eps(x) & [0, 1]``, exact no-op on points
  already inside);
- the step rule of PGD-style loops: :func:`default_alpha` (``2.5 * eps / steps``);
- margins: :func:`margins` (``z_y - max_{i != y} z_i``); the one rule of an untargeted verdict,
  :func:`verdict_margins` and :func:`correct` (correct iff the margin is strictly positive: a tie
  between the true class and another is wrong; computed in the logits' own precision);
- identities: :func:`tensors_sha256` (of data), :func:`model_sha256` (of a model's weights);
- seeded randomness: :func:`make_generator`, :func:`rand_like`, :func:`randn_like`,
  :func:`random_in_ball` (a local ``torch.Generator``; ``None`` draws from the global RNG where
  the caller documents that).

Zero guard of the ball projection. The L2 factor is ``min(1, eps / ||d||)``, written as
``where(||d|| <= eps, 1, eps / max(||d||, 1e-30))``: the guard only acts where the norm is exactly
zero or denormal-small (then the sample is inside the ball anyway and the factor is 1), so it never
biases a non-zero factor, and the result is bit for bit torchattacks' ``min(eps / ||d||, 1)`` with
its ``nan_to_num``; an additive ``eps / (||d|| + 1e-12)`` (the other copy this replaces) changes
every factor in float64 and makes points at distance eps (within 1e-12) come out strictly inside.
1e-30 rather than 1e-12 because a norm in (1e-30, 1e-12) is a legitimate float32/float64 value.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from .errors import InputError

#: the zero guard of norms we divide by (see the module docstring)
NORM_GUARD = 1e-30


def _norm_name(norm) -> str:
    return getattr(norm, "value", norm)


def bshape(x: Tensor) -> Tuple[int, ...]:
    """``(-1, 1, ..., 1)``: a per-sample (B,) tensor viewed to broadcast against ``x``."""
    return (-1,) + (1,) * (x.dim() - 1)


def default_alpha(eps: float, steps: int) -> float:
    """The default PGD step size ``2.5 * eps / steps`` (Madry et al. 2018): ``steps`` steps can
    cross the ball's diameter and a bit more, whatever the start."""
    return 2.5 * float(eps) / int(steps)


def per_sample_norm(x: Tensor) -> Tensor:
    """The L2 norm of each sample (over all non-batch dimensions), shape (B,)."""
    return x.reshape(x.shape[0], -1).norm(dim=1)


def ball_factor(n: Tensor, eps: float) -> Tensor:
    """``min(1, eps / n)`` per sample: the factor that brings a perturbation of L2 norm ``n`` into
    the eps ball (1 inside; exactly 1 at ``n = 0``, also when ``eps = 0``)."""
    return torch.where(n <= eps, torch.ones_like(n), eps / n.clamp_min(NORM_GUARD))


def clip_delta(delta: Tensor, eps: float, norm) -> Tensor:
    """``delta`` brought into the eps ball: Linf by clamping each coordinate, L2 by rescaling."""
    if _norm_name(norm) == "Linf":
        return torch.clamp(delta, min=-eps, max=eps)
    return delta * ball_factor(per_sample_norm(delta), eps).view(bshape(delta))


def ball_slack(eps: float) -> float:
    """How far beyond ``eps`` an example may lie and still count as inside the threat model
    (float rounding of a projection: relative ``1e-5`` plus absolute ``1e-6``). The evaluation's
    check of the attacks' examples and :func:`robustdeq.eval.card.judge` use this one rule."""
    return float(eps) * 1e-5 + 1e-6


def project_ball(x_adv: Tensor, x: Tensor, eps: float, norm) -> Tensor:
    """Project ``x_adv`` on the eps ball around ``x`` intersected with [0, 1]; samples already
    inside are returned bit for bit (so projecting a library's output is a strict no-op there)."""
    b = x.shape[0]
    view = bshape(x)
    delta = x_adv - x
    flat = delta.reshape(b, -1)
    if _norm_name(norm) == "Linf":
        inside = flat.abs().amax(dim=1) <= eps if flat.shape[1] else torch.ones(b, dtype=torch.bool)
    else:
        inside = flat.norm(dim=1) <= eps
    in_box = ((x_adv >= 0) & (x_adv <= 1)).reshape(b, -1).all(dim=1)
    ok = (inside.to(x.device) & in_box).view(view)
    return torch.where(ok, x_adv, torch.clamp(x + clip_delta(delta, eps, norm), min=0, max=1))


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{i != y} z_i`` per sample (negative: misclassified), shape (B,)."""
    z_y = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return z_y - others.max(dim=1)[0]


def verdict_margins(logits: Tensor, y: Tensor) -> Tensor:
    """The margins an untargeted verdict reads: :func:`margins` in the logits' own precision
    (float64 stays float64: a margin below float32's resolution is not rounded to a tie; float16,
    bfloat16 and integer logits are upcast to float32), ``-inf`` for rows with a non-finite logit.
    Correct iff ``> 0`` (:func:`correct`)."""
    if not logits.is_floating_point() or logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    m = margins(logits, y)
    bad = ~torch.isfinite(logits).all(dim=1)
    return torch.where(bad, torch.full_like(m, float("-inf")), m)


def correct(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) bool, the one rule of an untargeted verdict (the evaluation's, :func:`~robustdeq.eval.card.judge`'s
    and every attack's): correct iff the true class's logit is strictly above every other
    (``verdict_margins > 0``). A tie between the true class and another counts as wrong, whatever
    the classes' order (``argmax`` would resolve it to the lower index); a non-finite logit too.
    Targeted verdicts are ``argmax == target`` instead (the attacks document it)."""
    return verdict_margins(logits, y) > 0


def targeted_margins(logits: Tensor, target: Tensor) -> Tensor:
    """How far a targeted attack is from success, per sample: ``max_{i != t} z_i - z_t`` in the
    logits' own precision (as :func:`verdict_margins`), ``<= 0`` exactly where the targeted
    verdict holds, ``argmax == target``: at a tie between the target and a class of lower index
    (which ``argmax`` picks) it is the dtype's smallest positive number instead of 0. ``+inf``
    for rows with a non-finite logit (no success)."""
    m = -verdict_margins(logits, target)
    miss = (m == 0) & (logits.argmax(dim=1) != target)
    return torch.where(miss, torch.full_like(m, torch.finfo(m.dtype).tiny), m)


# -- randomness -----------------------------------------------------------------------------------
def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator: seeded, or with a fresh non-deterministic seed (never the global RNG).

    Random tensors are drawn on the CPU and moved to the input's device, so a seed gives the
    same draws on every device.
    """
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def seeded_generator(seed: Optional[int]) -> Optional[torch.Generator]:
    """A CPU generator seeded with ``seed``, or None (draw from the global RNG) when seed is None."""
    return torch.Generator().manual_seed(int(seed)) if seed is not None else None


def draw(kind: str, shape, like: Tensor, gen: Optional[torch.Generator]) -> Tensor:
    """Noise of ``shape`` in the dtype of ``like`` on its device: U[0, 1) for ``kind="uniform"``,
    N(0, 1) otherwise; from ``gen`` (drawn on the CPU, then moved) or, when ``gen`` is None,
    from the global RNG on the device."""
    fn = torch.rand if kind == "uniform" else torch.randn
    if gen is None:  # the global RNG, on the tensor's device
        return fn(shape, dtype=like.dtype, device=like.device)
    return fn(shape, generator=gen, dtype=like.dtype).to(like.device)


def rand_like(x: Tensor, gen: Optional[torch.Generator]) -> Tensor:
    """U[0, 1) noise with the shape, dtype and device of ``x`` (from ``gen``, drawn on the CPU;
    None: the global RNG)."""
    return draw("uniform", x.shape, x, gen)


def randn_like(x: Tensor, gen: Optional[torch.Generator]) -> Tensor:
    """N(0, 1) noise with the shape, dtype and device of ``x`` (see :func:`rand_like`)."""
    return draw("normal", x.shape, x, gen)


def random_in_ball(x: Tensor, eps: float, norm, gen: Optional[torch.Generator], *,
                   radius: str = "volume") -> Tensor:
    """A random perturbation in the eps ball, shape of ``x``. Linf: uniform in the cube. L2: a
    Gaussian direction at radius ``eps * U^(1/d)`` (``radius="volume"``: uniform in the ball) or
    ``eps * U`` (``radius="linear"``: torchattacks' PGDL2 random start)."""
    if _norm_name(norm) == "Linf":
        return (2 * rand_like(x, gen) - 1) * eps
    b = x.shape[0]
    d = x[0].numel()
    direction = randn_like(x, gen).reshape(b, -1)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(NORM_GUARD)
    r = draw("uniform", (b, 1), x, gen)
    if radius == "volume":
        r = r ** (1.0 / max(d, 1))
    return (direction * r * eps).view_as(x)


__all__ = ["NORM_GUARD", "bshape", "default_alpha", "per_sample_norm", "ball_factor", "clip_delta", "ball_slack",
           "project_ball", "margins", "verdict_margins", "correct", "targeted_margins", "make_generator", "seeded_generator", "rand_like", "randn_like",
           "random_in_ball", "draw"]


def check_labels(y: Optional[Tensor], n: int) -> None:
    """Labels ``y`` (or None) for ``n`` inputs: a 1-D integer tensor of length ``n``, else :class:`InputError`."""
    if y is None:
        return
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != n:
        raise InputError(f"y must be a 1-D tensor of {n} labels, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"y must hold integer class labels, got dtype {y.dtype}")


def tensors_sha256(*tensors: Tensor) -> str:
    """SHA-256 over the dtype, shape and bytes of each tensor (the data's identity)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's class name and its state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
