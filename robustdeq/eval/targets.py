"""What an evaluation attacks and measures besides the model: its adaptive views (defense views
and transfer sources), the trajectory model, and per-state accuracy and solver statistics."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..deq.protocols import is_trajectory_model
from .._tensor import correct as is_correct
from ..errors import ConfigError

def adaptive_views(model: nn.Module, transfer_from: Any = None) -> Dict[str, nn.Module]:
    """The modules an evaluation attacks besides ``model`` (every one judged on ``model``):
    ``model.adaptive_views()`` of an inference-time defense, a transfer view over the model a
    wrapper holds as ``model.model`` ("transfer-base", unless the defense offers one), and one
    transfer view per source in ``transfer_from`` (an ``nn.Module`` or a dict name -> module)."""
    from ..deq.views import TransferView
    views: Dict[str, nn.Module] = {}
    if hasattr(model, "adaptive_views"):
        views = dict(model.adaptive_views())
    base = getattr(model, "model", None)
    if (isinstance(base, nn.Module) and base is not model and not is_trajectory_model(model)
            and not any(isinstance(v, TransferView) and v.model is base for v in views.values())):
        views.setdefault("transfer-base", TransferView(base, "base"))
    if transfer_from is not None:
        sources = transfer_from if isinstance(transfer_from, dict) else {"source": transfer_from}
        for name, src in sources.items():
            if not isinstance(name, str) or not name or "@" in name or "/" in name:
                raise ConfigError(f"transfer_from names must be plain strings, got {name!r}")
            if not isinstance(src, nn.Module):
                raise ConfigError(f"transfer_from[{name!r}] must be an nn.Module x -> logits, "
                                  f"got {type(src).__name__}")
            if src is model:
                raise ConfigError(f"transfer_from[{name!r}] is the evaluated model itself")
            views[f"transfer-{name}"] = TransferView(src, name)
    for k, v in views.items():
        if not isinstance(v, nn.Module) or not isinstance(k, str) or not k or "@" in k or "/" in k:
            raise ConfigError(f"adaptive view {k!r} must be an nn.Module with a plain name")
        if k in ("model", "deq"):
            raise ConfigError(f"adaptive view name {k!r} is reserved")
    return views


def trajectory_model(model: nn.Module) -> Optional[nn.Module]:
    """The module whose trajectory the per-state statistics read: the model itself (a DEQ or
    weight-tied model), or ``model.model`` for a wrapper (defense) without its own trajectory."""
    if is_trajectory_model(model):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and is_trajectory_model(inner):
        return inner
    return None


def is_solver_model(m: Optional[nn.Module]) -> bool:
    """``m`` runs a fixed-point solver (``solve`` and ``solver_config``)."""
    return m is not None and hasattr(m, "solve") and hasattr(m, "solver_config")


def with_solver(model: nn.Module, solver) -> nn.Module:
    """``model`` solved with ``solver`` (None: the model itself): a shallow copy sharing every
    parameter, buffer and submodule, whose own ``solver_config`` is ``solver``."""
    if solver is None:
        return model
    if not is_solver_model(model):
        raise ConfigError(f"solver= is for a model that runs a fixed-point solver (a DEQ); "
                          f"{type(model).__name__} has none")
    import copy
    view = copy.copy(model)
    view.solver_config = solver
    return view


def _summary(residual: Tensor, steps: Tensor, converged: Tensor, diverged: Tensor) -> Dict[str, float]:
    res = residual.float()
    finite = torch.isfinite(res)
    return {
        "mean_steps": float(steps.float().mean()),
        "converged_fraction": float(converged.float().mean()),
        "diverged_fraction": float(diverged.float().mean()),
        "mean_residual": float(res[finite].mean()) if bool(finite.any()) else float("nan"),
        "max_residual": float(res[finite].max()) if bool(finite.any()) else float("nan"),
        "non_finite_residuals": int((~finite).sum()),
    }


def trajectory_stats(tmodel: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Dict[str, Any]:
    """Per-state accuracy of ``readout(z_k)``, solver statistics and the mean residual per step.

    For a DEQ every step ``0..max_iter-1`` is recorded (states after a sample stopped are its
    frozen iterate, their residual that of the frozen iterate); for a weight-tied model the layer
    outputs ``0..depth``. Returns ``{"per_state": {"steps", "accuracy"}, "solver": summary |
    None, "residual_curve": [float] | None}``; for a solver model also
    ``"residual_running_fraction"`` (the fraction of samples the solver has not stopped at each
    step) and ``"residual_tolerance"`` (``{"tol", "stop_mode"}``).
    """
    solver = is_solver_model(tmodel)
    record: Any = list(range(tmodel.solver_config.max_iter)) if solver else "all"
    correct: Optional[Tensor] = None
    steps_idx: Optional[List[int]] = None
    res_sum: Optional[Tensor] = None
    r_list, s_list, c_list, d_list = [], [], [], []
    run_sum: Optional[Tensor] = None
    n = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            eq = tmodel.run(xb, record=record)
            states = sorted(eq.trajectory, key=lambda t: t.step)
            idx = [t.step for t in states]
            if steps_idx is None:
                steps_idx = idx
                correct = torch.zeros(len(idx), dtype=torch.float64)
            elif idx != steps_idx:  # cannot happen with explicit records; be safe
                raise RuntimeError(f"recorded states differ between batches: {idx} vs {steps_idx}")
            for j, t in enumerate(states):
                # a tie is wrong (the evaluation's rule, robustdeq._tensor.correct)
                correct[j] += float(is_correct(tmodel.readout(t.z), yb).sum())
            if solver:
                R = torch.stack([t.residual.float() for t in states]).cpu()  # (K, B)
                for k in range(1, R.shape[0]):  # forward-fill unevaluated steps
                    R[k] = torch.where(torch.isfinite(R[k]), R[k], R[k - 1])
                R = torch.nan_to_num(R, nan=float("nan"), posinf=float("nan"))
                part = torch.nansum(R, dim=1).double()
                res_sum = part if res_sum is None else res_sum + part
                st = eq.stats
                # a sample is still iterating at step k until its solver stopped it
                running = (torch.tensor(idx).view(-1, 1) < st.steps.detach().cpu().view(1, -1)).double().sum(1)
                run_sum = running if run_sum is None else run_sum + running
                r_list.append(st.residual.detach().cpu())
                s_list.append(st.steps.detach().cpu())
                c_list.append(st.converged.detach().cpu())
                d_list.append(st.diverged.detach().cpu())
            n += xb.shape[0]
    out: Dict[str, Any] = {"per_state": None, "solver": None, "residual_curve": None}
    if steps_idx is not None and n:
        out["per_state"] = {"steps": steps_idx, "accuracy": (correct / n).tolist()}
    if solver and r_list:
        out["solver"] = _summary(torch.cat(r_list), torch.cat(s_list), torch.cat(c_list), torch.cat(d_list))
        out["residual_curve"] = (res_sum / n).tolist()
        cfg = tmodel.solver_config
        # what the curve means: a stopped sample keeps its last residual, so the mean flattens
        # where samples reach the tolerance (not a stagnating solver); the plot shows both
        out["residual_running_fraction"] = (run_sum / n).tolist()
        out["residual_tolerance"] = {"tol": float(cfg.tol), "stop_mode": str(getattr(cfg.stop_mode, "value", cfg.stop_mode))}
    return out


__all__ = ["adaptive_views", "trajectory_model", "is_solver_model", "trajectory_stats", "with_solver"]
