"""One call, one record: :func:`benchmark` evaluates a model and writes its model card;
:func:`judge` scores adversarial examples produced elsewhere.

A model card (``model_card.json`` + ``model_card.md``, in the spirit of RobustBench's
leaderboard entries, Croce et al. 2021) records what a robust-accuracy figure needs to be read and
reproduced: the model (name, class names of its architecture, parameter count, checkpoint
sha256), the data (name, number of samples, sha256 of the tensors), the threat model and radius,
clean and robust accuracy with Clopper-Pearson 95 % intervals (the exact binomial interval,
Clopper & Pearson 1934; it covers the sampling error of a finite test set, not the attack's
looseness: robust accuracy stays an upper bound), the suite with the per-attack breakdown, the
solver statistics on clean and adversarial inputs, the checks that fired, the time taken and the
versions of robustdeq, torch, pyautoattack and torchattacks.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._tensor import ball_slack, correct as is_correct, tensors_sha256
from ..errors import ConfigError, InputError

logger = logging.getLogger(__name__)

CARD_SCHEMA = "robustdeq-model-card/1"
ADV_SCHEMA = "robustdeq-adversarial/1"


# -- statistics -----------------------------------------------------------------------------------
def clopper_pearson(k: int, n: int, level: float = 0.95) -> Tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided ``level`` confidence interval of a binomial
    proportion with ``k`` successes out of ``n``: the ``alpha/2`` quantile of Beta(k, n - k + 1)
    and the ``1 - alpha/2`` quantile of Beta(k + 1, n - k) (0 and 1 at the ends)."""
    from scipy.stats import beta
    if not (isinstance(n, int) and n >= 1 and isinstance(k, int) and 0 <= k <= n):
        raise ConfigError(f"clopper_pearson needs integers 0 <= k <= n, n >= 1; got k={k!r}, n={n!r}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level!r}")
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


# -- provenance -------------------------------------------------------------------------------------
def file_sha256(path: Union[str, os.PathLike]) -> str:
    """The SHA-256 hex digest of the file at ``path`` (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> Dict[str, Optional[str]]:
    """Versions of robustdeq, torch, pyautoattack, torchattacks and Python (None: not installed)."""
    from importlib import metadata
    from .. import __version__
    out: Dict[str, Optional[str]] = {"robustdeq": __version__, "torch": torch.__version__}
    for pkg in ("pyautoattack", "torchattacks"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["python"] = platform.python_version()
    return out


def architecture(model: nn.Module) -> Dict[str, Any]:
    """Class names of the model and its parts (injection / cell / head of a DEQ, the wrapped net
    of an adopted model) and the sorted set of module classes it is made of."""
    arch: Dict[str, Any] = {"class": type(model).__name__}
    for part in ("injection", "cell", "head", "net"):
        m = getattr(model, part, None)
        if isinstance(m, nn.Module):
            arch[part] = type(m).__name__
    arch["modules"] = sorted({type(m).__name__ for m in model.modules()})
    return arch


def parameter_count(model: nn.Module) -> int:
    """Number of parameters of ``model`` (a parameter shared by several modules counted once)."""
    return int(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))


# -- the card ----------------------------------------------------------------------------------------
def model_card(report, model: nn.Module, *, name: str, dataset: Optional[str], x: Tensor, y: Tensor,
               seconds: float, checkpoint: Optional[Union[str, os.PathLike]] = None,
               level: float = 0.95) -> Dict[str, Any]:
    """The card of an :class:`~robustdeq.eval.report.EvalReport` with one radius (see module)."""
    if len(report.results) != 1:
        raise ConfigError(f"a model card holds one radius; the report has {len(report.results)}")
    res = report.results[0]
    n = int(report.n_samples)
    k_clean = int(round(report.clean_accuracy * n))
    k_rob = int(sum(bool(r) for r in res.robust))
    attacks = []
    for a in res.attacks:
        attacks.append({"key": a.key, "name": (a.describe or {}).get("name", a.spec),
                        "implementation": (a.describe or {}).get("implementation"),
                        "view": a.view, "kind": a.kind, "accuracy": a.accuracy,
                        "cumulative_accuracy": a.cumulative_accuracy,
                        "new_successes": a.new_successes, "seconds": a.seconds})
    solver = res.solver or {}
    ckpt = None
    if checkpoint is not None:
        ckpt = {"path": str(checkpoint), "sha256": file_sha256(checkpoint)}
    fired = [c.name for c in report.checks if c.fired]
    return {
        "schema": CARD_SCHEMA,
        "model": {"name": name, "architecture": architecture(model),
                  "parameters": parameter_count(model), "checkpoint": ckpt},
        "data": {"name": dataset, "n_samples": n, "sha256": tensors_sha256(x, y)},
        "threat": {"norm": report.threat, "eps": float(res.eps)},
        "clean": {"accuracy": k_clean / n, "correct": k_clean,
                  "ci": list(clopper_pearson(k_clean, n, level)), "ci_level": level},
        "robust": {"accuracy": k_rob / n, "robust": k_rob,
                   "ci": list(clopper_pearson(k_rob, n, level)), "ci_level": level,
                   "statement": report.bound_statement},
        "suite": {"name": report.suite if isinstance(report.suite, str) else list(report.suite),
                  "attacks": attacks, "first_success": list(res.first_success)},
        "solver": {"clean": (report.clean or {}).get("solver"),
                   "adversarial": solver.get("adversarial")},
        "checks": {"fired": fired, "run": [c.name for c in report.checks if not c.skipped]},
        "time": {"total_s": float(seconds), **{k: float(v) for k, v in (report.timings or {}).items()
                                               if isinstance(v, (int, float))}},
        "versions": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def card_markdown(card: Dict[str, Any]) -> str:
    """The card as a Markdown page."""
    m, d, t = card["model"], card["data"], card["threat"]
    cl, rb = card["clean"], card["robust"]
    lvl = int(round(100 * cl["ci_level"]))
    lines = [f"# Model card: {m['name']}", "",
             f"- architecture: {m['architecture']['class']}"
             + "".join(f", {k} {m['architecture'][k]}" for k in ("injection", "cell", "head", "net")
                       if k in m["architecture"]),
             f"- parameters: {m['parameters']:,}",
             f"- checkpoint sha256: {m['checkpoint']['sha256'] if m['checkpoint'] else 'n/a (in-memory model)'}",
             f"- data: {d['name'] or 'unnamed'}, {d['n_samples']} samples (sha256 {d['sha256'][:16]}...)",
             f"- threat model: {t['norm']}, eps = {t['eps']:g}", "",
             f"| | accuracy | {lvl} % CI (Clopper-Pearson) |", "| --- | --- | --- |",
             f"| clean | {_pct(cl['accuracy'])} ({cl['correct']}/{d['n_samples']}) | "
             f"[{_pct(cl['ci'][0])}, {_pct(cl['ci'][1])}] |",
             f"| robust | {_pct(rb['accuracy'])} ({rb['robust']}/{d['n_samples']}) | "
             f"[{_pct(rb['ci'][0])}, {_pct(rb['ci'][1])}] |", "",
             rb["statement"], "",
             f"## Suite: {card['suite']['name']}", "",
             "| attack | implementation | accuracy alone | cumulative | new successes | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for a in card["suite"]["attacks"]:
        lines.append(f"| {a['name']} ({a['view']}) | {a['implementation']} | {_pct(a['accuracy'])} | "
                     f"{_pct(a['cumulative_accuracy'])} | {a['new_successes']} | {a['seconds']:.2f} |")
    lines += ["", "## Solver", ""]
    for which in ("clean", "adversarial"):
        s = card["solver"].get(which)
        if s:
            lines.append(f"- {which}: mean steps {s.get('mean_steps', float('nan')):.2f}, converged "
                         f"{_pct(s.get('converged_fraction'))}, max residual {s.get('max_residual', float('nan')):.2e}")
        else:
            lines.append(f"- {which}: n/a (no solver trajectory)")
    fired = card["checks"]["fired"]
    lines += ["", f"Checks fired: {', '.join(fired) if fired else 'none'} "
              f"(of {len(card['checks']['run'])} run).", "",
              f"Time: {card['time']['total_s']:.1f} s. Versions: "
              + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + f". Created {card['created']}.", ""]
    return "\n".join(lines)


def write_card(card: Dict[str, Any], out: Union[str, os.PathLike]) -> Path:
    """Write ``model_card.json`` and ``model_card.md`` under the folder ``out``; returns it."""
    from .report import atomic_write_text
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "model_card.md", card_markdown(card))
    atomic_write_text(out / "model_card.json", json.dumps(card, indent=2) + "\n")  # last: marks it whole
    return out


def benchmark(model: nn.Module, x: Tensor, y: Tensor, *, threat: str = "Linf", eps: float,
              suite: Union[str, Sequence[Any]] = "standard", name: Optional[str] = None,
              dataset: Optional[str] = None, out: Union[str, os.PathLike, None] = None,
              checkpoint: Union[str, os.PathLike, None] = None, save_adversarial: bool = False,
              level: float = 0.95, **options: Any) -> Dict[str, Any]:
    """Evaluate ``model`` on ``(x, y)`` at one radius and return its model card (see module).

    Args:
        model: ``x -> logits`` (any model :func:`~robustdeq.eval.evaluate` takes); never changed.
        x, y: inputs in [0, 1] and int64 labels.
        threat, eps, suite: the threat model, one radius and the attack suite.
        name: the model's name on the card (default: its class name); dataset: the data's name.
        out: a folder to write ``model_card.json`` / ``model_card.md`` to (and, with
            ``save_adversarial``, ``adversarial.pt``: the worst-case inputs found with ``x``,
            ``y``, ``eps`` and ``norm``, the format :func:`judge_file` reads).
        checkpoint: the checkpoint file the model was loaded from (its sha256 goes on the card).
        level: confidence level of the intervals.
        options: further :func:`~robustdeq.eval.evaluate` options (steps, seed, batch_size, ...).
    """
    from .harness import evaluate
    if isinstance(eps, (list, tuple)) or isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ConfigError(f"benchmark takes one radius eps (a number), got {eps!r}")
    if save_adversarial and out is None:
        raise ConfigError("save_adversarial needs an out folder")
    t0 = time.perf_counter()
    report = evaluate(model, x, y, threat=threat, eps=float(eps), suite=suite, **options)
    seconds = time.perf_counter() - t0
    card = model_card(report, model, name=name or type(model).__name__, dataset=dataset, x=x, y=y,
                      seconds=seconds, checkpoint=checkpoint, level=level)
    if out is not None:
        write_card(card, out)
        if save_adversarial:
            x_adv = getattr(report.results[0], "x_adv", None)
            if x_adv is None:
                raise ConfigError("the evaluation kept no adversarial examples (a resumed run?)")
            torch.save({"schema": ADV_SCHEMA, "x_adv": x_adv.detach().cpu(), "x": x.detach().cpu(),
                        "y": y.detach().cpu(), "eps": float(eps), "norm": report.threat},
                       Path(out) / "adversarial.pt")
            card["adversarial"] = "adversarial.pt"
            write_card(card, out)
    return card


# -- judging adversarial examples produced elsewhere ---------------------------------------------
def check_in_ball(x_adv: Tensor, x: Tensor, eps: float, norm: str, *, tol: Optional[float] = None) -> None:
    """Raise an :class:`InputError` naming how many examples lie outside the ``norm`` ball of
    radius ``eps`` around ``x`` or outside [0, 1] (non-finite ones included), and by how much.
    ``tol``: the float rounding allowed beyond the ball (default
    :func:`robustdeq._tensor.ball_slack`, the evaluation's own rule) and beyond [0, 1] (default
    ``1e-6``)."""
    if x_adv.shape != x.shape:
        raise InputError(f"x_adv has shape {tuple(x_adv.shape)} but x has {tuple(x.shape)}")
    b = x.shape[0]
    flat = x_adv.detach().reshape(b, -1).double()
    delta = flat - x.detach().reshape(b, -1).double()
    problems = []
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        problems.append(f"{int((~finite).sum())} contain non-finite values")
    if norm == "Linf":
        dist = delta.abs().amax(dim=1)
    elif norm == "L2":
        dist = delta.norm(dim=1)
    else:
        raise ConfigError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    out_ball = finite & (dist > eps + (ball_slack(eps) if tol is None else tol))
    if bool(out_ball.any()):
        problems.append(f"{int(out_ball.sum())} lie outside the {norm} ball of radius {eps:g} "
                        f"(largest distance {float(dist[out_ball].max()):.6g}, over by "
                        f"{float(dist[out_ball].max()) - eps:.3g})")
    below = (-flat.amin(dim=1)).clamp(min=0)
    above = (flat.amax(dim=1) - 1).clamp(min=0)
    range_tol = 1e-6 if tol is None else tol
    out_range = finite & ((below > range_tol) | (above > range_tol))
    if bool(out_range.any()):
        problems.append(f"{int(out_range.sum())} have values outside [0, 1] (by up to "
                        f"{float(torch.maximum(below, above)[out_range].max()):.3g})")
    if problems:
        raise InputError(f"refusing to judge: of {b} adversarial examples, " + "; ".join(problems))


def judge(model: nn.Module, x_adv: Tensor, y: Tensor, *, x: Tensor, eps: float, norm: str = "Linf",
          batch_size: int = 256, level: float = 0.95) -> Dict[str, Any]:
    """The model's accuracy on adversarial examples produced elsewhere, after checking that every
    one lies in the ``norm`` ball of radius ``eps`` around its clean input ``x`` and in [0, 1]
    (:func:`check_in_ball`). A sample counts as correct where its true class's logit is strictly
    above every other (a tie is wrong, as in :func:`~robustdeq.eval.evaluate`). The model runs in
    eval mode and is left as it was."""
    from ..guard import preserve_model
    if not isinstance(x_adv, Tensor) or not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError("judge needs tensors x_adv, x and y")
    if y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise InputError(f"y must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ConfigError(f"eps must be a number >= 0, got {eps!r}")
    if x.shape[0] == 0:
        raise InputError("judge needs at least one adversarial example, got an empty batch")
    check_in_ball(x_adv, x, float(eps), norm)
    n = int(x.shape[0])
    correct = 0
    clean_correct = 0
    with preserve_model(model, "eval", who="judge"), torch.no_grad():
        for i in range(0, n, batch_size):
            logits = model(x_adv[i:i + batch_size])
            if i == 0:
                from ..attacks.base import check_num_classes
                check_num_classes(y, logits)
            # correct: the true class's logit strictly above every other (a tie counts as wrong,
            # as in the evaluation's own judgement)
            correct += int(is_correct(logits, y[i:i + batch_size]).sum())
            clean_correct += int(is_correct(model(x[i:i + batch_size]), y[i:i + batch_size]).sum())
    return {"n_samples": n, "norm": norm, "eps": float(eps), "accuracy": correct / n,
            "correct": correct, "ci": list(clopper_pearson(correct, n, level)), "ci_level": level,
            "clean_accuracy": clean_correct / n}


def load_adversarial(path: Union[str, os.PathLike], *, root: Any = None) -> Dict[str, Any]:
    """Read an adversarial-examples file (``torch.load(weights_only=True)``): a dict with
    ``x_adv``, ``eps``, ``norm`` and either ``x`` and ``y`` (the clean inputs and labels) or
    ``dataset`` (a registered data set's name), ``split`` (default "test") and optionally
    ``indices`` (which of its samples, default the first ``len(x_adv)``). ``robustdeq attack`` also
    stores ``attack`` (the attack's description, JSON) and ``robust`` (its per-sample verdicts):
    metadata, not read here; the model's verdicts are :func:`judge`'s own."""
    from ..checkpoint import safe_torch_load
    from ..errors import CheckpointError
    obj = safe_torch_load(path, what="adversarial-examples file")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: an adversarial-examples file holds a dict, got {type(obj).__name__}")
    from ..errors import reject_unknown
    reject_unknown(obj, ("schema", "x_adv", "x", "y", "eps", "norm", "dataset", "split", "indices",
                         "attack", "robust"), f"adversarial-examples file {path}")
    missing = [k for k in ("x_adv", "eps", "norm") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    x_adv = obj["x_adv"]
    if not isinstance(x_adv, Tensor) or x_adv.dim() < 2:
        raise CheckpointError(f"{path}: x_adv must be a (N, ...) tensor")
    if "x" in obj:
        if "y" not in obj:
            raise CheckpointError(f"{path}: has x but no labels y")
        x, y = obj["x"], obj["y"]
    elif "dataset" in obj:
        from ..data import load_dataset
        xs, ys = load_dataset(str(obj["dataset"]), str(obj.get("split", "test")), root=root)
        idx = obj.get("indices")
        idx = torch.arange(x_adv.shape[0]) if idx is None else torch.as_tensor(idx, dtype=torch.int64)
        if idx.numel() != x_adv.shape[0] or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= xs.shape[0])):
            raise CheckpointError(f"{path}: indices do not pick {x_adv.shape[0]} samples of "
                                  f"{obj['dataset']} ({xs.shape[0]} samples)")
        x, y = xs[idx], ys[idx]
        if "y" in obj and not torch.equal(torch.as_tensor(obj["y"]), y):
            raise CheckpointError(f"{path}: its labels y differ from the data set's")
    else:
        raise CheckpointError(f"{path}: needs the clean inputs: x and y, or a dataset name")
    eps = obj["eps"]
    return {"x_adv": x_adv.float(), "x": x.float(), "y": y, "eps": float(eps), "norm": str(obj["norm"])}


def judge_file(model: nn.Module, path: Union[str, os.PathLike], *, root: Any = None,
               **kw: Any) -> Dict[str, Any]:
    """:func:`judge` on the examples of :func:`load_adversarial` ``(path)``."""
    d = load_adversarial(path, root=root)
    return judge(model, d["x_adv"], d["y"], x=d["x"], eps=d["eps"], norm=d["norm"], **kw)


def benchmark_checkpoints(paths: Sequence[Union[str, os.PathLike]], out: Union[str, os.PathLike], *,
                          dataset: str = "digits", split: str = "test", root: Any = None,
                          n: Optional[int] = None, eps: float, threat: str = "Linf",
                          suite: Union[str, Sequence[Any]] = "standard",
                          save_adversarial: bool = False, **options: Any) -> List[Dict[str, Any]]:
    """:func:`benchmark` every checkpoint under one protocol (the same ``n`` samples of one data
    set split, threat model, radius, suite and options): one card per checkpoint under
    ``out/<checkpoint name>/`` and ``out/leaderboard.md`` / ``.json``; returns the cards. A card
    already under ``out/<checkpoint name>/`` from a benchmark of the same checkpoint file, data
    and settings is reused (a killed benchmark resumes); any other is replaced."""
    from ..checkpoint import load_model
    from ..data import load_dataset
    if not paths:
        raise ConfigError("benchmark needs at least one checkpoint")
    x, y = load_dataset(dataset, split, root=root)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an int >= 1, got {n!r}")
        x, y = x[:n], y[:n]
    names: Dict[str, int] = {}
    cards = []
    data_sha = tensors_sha256(x, y)   # the same samples for every checkpoint
    for path in paths:
        stem = Path(path).stem
        names[stem] = names.get(stem, 0) + 1
        label = stem if names[stem] == 1 else f"{stem}-{names[stem]}"
        # what decides the card: a card of the same key already under out/<label> is reused, so a
        # killed benchmark resumes with the checkpoints it had not finished
        key = hashlib.sha256(json.dumps(
            {"checkpoint": file_sha256(path), "data": data_sha, "dataset": f"{dataset}:{split}",
             "name": label, "threat": threat, "eps": float(eps), "suite": suite,
             "save_adversarial": save_adversarial,
             "options": {k: v for k, v in options.items() if k != "progress"}},
            sort_keys=True, default=str).encode()).hexdigest()
        card = _finished_card(Path(out) / label, key, save_adversarial)
        if card is None:
            model, _ = load_model(path)
            card = benchmark(model, x, y, threat=threat, eps=eps, suite=suite, name=label,
                             dataset=f"{dataset}:{split}", out=Path(out) / label,
                             checkpoint=path, save_adversarial=save_adversarial, **options)
            card["benchmark_key"] = key
            write_card(card, Path(out) / label)  # with its key: the card is finished
        cards.append(card)
    write_leaderboard(cards, out)
    return cards


def _finished_card(folder: Path, key: str, save_adversarial: bool) -> Optional[Dict[str, Any]]:
    """The card under ``folder`` written by a benchmark of the same key (and its adversarial
    examples, when asked for), or None (missing, unreadable or of other settings: recomputed)."""
    try:
        card = json.loads((folder / "model_card.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("cannot read %s (%s); evaluating that checkpoint again", folder / "model_card.json", e)
        return None
    if not isinstance(card, dict) or card.get("benchmark_key") != key:
        return None
    if save_adversarial and not (folder / "adversarial.pt").is_file():
        return None
    logger.info("%s holds the card of this checkpoint under this protocol: reusing it", folder)
    return card


# -- several checkpoints under one protocol -------------------------------------------------------
def leaderboard(cards: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], str]:
    """Rows (sorted by robust accuracy, then clean accuracy, both decreasing) and Markdown of a
    leaderboard of cards evaluated under one protocol (same data, threat model and suite)."""
    if not cards:
        raise ConfigError("a leaderboard needs at least one model card")
    proto = {(c["data"]["sha256"], c["threat"]["norm"], c["threat"]["eps"], json.dumps(c["suite"]["name"]))
             for c in cards}
    if len(proto) != 1:
        raise ConfigError("the cards were not evaluated under one protocol (data, threat, eps, suite differ)")
    rows = [{"name": c["model"]["name"], "robust_accuracy": c["robust"]["accuracy"],
             "robust_ci": c["robust"]["ci"], "clean_accuracy": c["clean"]["accuracy"],
             "clean_ci": c["clean"]["ci"], "parameters": c["model"]["parameters"],
             "architecture": c["model"]["architecture"]["class"],
             "checkpoint_sha256": (c["model"]["checkpoint"] or {}).get("sha256")} for c in cards]
    rows.sort(key=lambda r: (-r["robust_accuracy"], -r["clean_accuracy"], r["name"]))
    c0 = cards[0]
    md = [f"# Leaderboard: {c0['data']['name'] or 'data'} ({c0['data']['n_samples']} samples), "
          f"{c0['threat']['norm']} eps = {c0['threat']['eps']:g}, suite {c0['suite']['name']}", "",
          "| rank | model | robust accuracy (95 % CI) | clean accuracy (95 % CI) | parameters |",
          "| --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows, 1):
        md.append(f"| {i} | {r['name']} | {_pct(r['robust_accuracy'])} [{_pct(r['robust_ci'][0])}, "
                  f"{_pct(r['robust_ci'][1])}] | {_pct(r['clean_accuracy'])} [{_pct(r['clean_ci'][0])}, "
                  f"{_pct(r['clean_ci'][1])}] | {r['parameters']:,} |")
    md += ["", "Robust accuracy is an upper bound (the worst case over the suite's attacks).", ""]
    return rows, "\n".join(md)


def write_leaderboard(cards: List[Dict[str, Any]], out: Union[str, os.PathLike]) -> Path:
    """Write ``leaderboard.json`` (the rows) and ``leaderboard.md`` of ``cards``
    (:func:`leaderboard`) into the folder ``out``, created if needed; returns the folder."""
    rows, md = leaderboard(cards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "leaderboard.md").write_text(md)
    return out


__all__ = ["benchmark", "benchmark_checkpoints", "judge", "judge_file", "load_adversarial", "check_in_ball", "model_card",
           "card_markdown", "write_card", "leaderboard", "write_leaderboard", "clopper_pearson",
           "file_sha256", "tensors_sha256", "package_versions", "architecture", "parameter_count",
           "CARD_SCHEMA", "ADV_SCHEMA"]
