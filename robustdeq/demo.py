"""The demo recipe: a DEQ trained on scikit-learn's digits, undefended and hardened with a training
recipe, both evaluated with the cascaded ``standard`` suite (Linf 0.1 and 0.2) and the undefended
one certified (L2). ``robustdeq demo`` runs :func:`run_demo`; ``robustdeq train`` takes the demo's
model and training options as its defaults (:func:`default_model_options`, :data:`DEMO_TRAIN`).

Importing this module does not import torch (the command line's help lists these defaults).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from ._support import round_floats, text_table
from .errors import ConfigError

logger = logging.getLogger(__name__)

DEMO_MODEL = {"name": "mlp_deq",
              "options": {"hidden": 128, "mean": 0.3, "std": 0.4, "norm": "spectral", "scale": 0.9}}
DEMO_TRAIN = {"epochs": 15, "batch_size": 32, "lr": 3e-3}
#: options of :data:`DEMO_MODEL` that are the digits' input statistics (dropped on other datasets)
DIGITS_STATS = ("mean", "std")
#: the demo's robustness table: row label -> prefix of the attack specs it reports after
DEMO_EPS = (0.1, 0.2)  # the Linf radii of the demo's evaluation and of its certificate
DEMO_ROWS = (("PGD (IFT)", "pgd-ift"), ("PGD (unrolled)", "pgd-unrolled"), ("APGD-CE", "apgd-ce"),
             ("APGD-T", "apgd-t"), ("Square", "square"), ("intermediate-state", "state"))


def default_model_options(model: str, dataset: str) -> dict:
    """The options ``robustdeq train`` uses for ``model`` unless ``--model-options`` overrides them:
    the demo's for ``mlp_deq`` (its input statistics on digits only)."""
    if model != DEMO_MODEL["name"]:
        return {}
    return {k: v for k, v in DEMO_MODEL["options"].items() if dataset == "digits" or k not in DIGITS_STATS}


def solver_table(summary: dict) -> str:
    """The demo's first table: test accuracy, solver statistics and training time."""
    rows = [["test accuracy", f"{summary['test_accuracy']:.4f}"],
            ["mean solver iterations", f"{summary['solver']['mean_steps']:.2f}"],
            ["converged fraction", f"{summary['solver']['converged_fraction']:.4f}"],
            ["mean final residual", f"{summary['solver']['mean_residual']:.2e}"],
            ["max final residual", f"{summary['solver']['max_residual']:.2e}"],
            ["training time (s)", f"{summary['train_time_s']:.1f}"]]
    return text_table(rows, ["metric", "value"])


def demo_rows(report) -> dict:
    """Accuracy after each attack group of a cascaded ``standard`` evaluation, per eps."""
    out = {}
    for r in report.results:
        col = {"clean": report.clean_accuracy}
        for label, prefix in DEMO_ROWS:
            hits = [a for a in r.attacks if a.spec.startswith(prefix)]
            col[label] = hits[-1].cumulative_accuracy if hits else None
        col["worst case"] = r.robust_accuracy
        out[f"{r.eps:g}"] = col
    return out


def certificate_note(cert_summary: dict, table: dict) -> str:
    """One paragraph setting the certificate beside the attack table: certified accuracy is a lower
    bound on robust accuracy, the table's worst case an upper bound, at the same Linf radii."""
    linf = cert_summary.get("certified_accuracy_linf") or cert_summary.get("certified_fraction_linf") or {}
    by_eps = {float(k): float(v) for k, v in linf.items() if v is not None}
    parts, certified = [], []
    for eps in DEMO_EPS:
        upper = (table.get(f"{eps:g}") or {}).get("worst case")
        if eps in by_eps and upper is not None:
            certified.append(by_eps[eps])
            parts.append(f"Linf {eps:g}: certified {100 * by_eps[eps]:.1f}% <= robust <= "
                         f"{100 * float(upper):.1f}% (attacked)")
    if not parts:
        return "the bracket (certified <= robust <= attacked): not available"
    text = "the bracket (certified <= robust <= attacked): " + "; ".join(parts)
    if not any(certified):
        text += (".\nAn undefended DEQ is certified at none of the table's radii: train with "
                 "`--defense ibp` (Linf) or `--defense lipschitz-margin` (L2) for useful certificates.")
    return text


#: the demo's evaluation protocol (options of :func:`robustdeq.eval.evaluate`)
DEMO_EVAL = {"threat": "Linf", "eps": list(DEMO_EPS), "suite": "standard", "steps": 20, "seed": 0,
             "cascade": True}


def _evaluate(model, x, y, out_dir, progress, protocol: Optional[dict] = None, resume: bool = True):
    from .eval import evaluate
    return evaluate(model, x, y, **(DEMO_EVAL if protocol is None else protocol), out_dir=out_dir,
                    progress=progress, resume=resume)


def _evaluate_checkpoint(checkpoint: str, x, y, out_dir: str, device: Optional[str], threads: int,
                         protocol: dict, resume: bool = True) -> None:
    """The second process of a two-job demo: evaluate the model saved at ``checkpoint`` as
    :func:`_evaluate` does in the main process (the ``protocol`` it is handed, the same report
    folder, ``resume``; no progress bars), with ``threads`` intra-op threads."""
    import torch

    from .checkpoint import load_model
    torch.set_num_threads(threads)
    model, _ = load_model(checkpoint, map_location=device or "cpu")
    if device is not None:
        x, y = x.to(device), y.to(device)
    _evaluate(model, x, y, Path(out_dir), False, protocol, resume)


class _SecondProcess:
    """One worker process (spawned: no state inherited from the parent's torch) running one call;
    :meth:`result` waits for it and re-raises its error; :meth:`stop` ends it (the demo failed)."""

    def __init__(self, fn, *args):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self.future = self.pool.submit(fn, *args)

    def result(self) -> None:
        try:
            self.future.result()
        finally:
            self.pool.shutdown(wait=True)

    def stop(self) -> None:
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            proc.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write_training_summary(path: Path, summary: dict) -> None:
    """``summary.json`` once the undefended model is trained: ``summary``, unless the file already
    holds the summary of this same training (a finished demo's, rerun), whose evaluation and
    certificate still describe the folder: a rerun refused later (another ``samples``) or killed
    does not wipe them."""
    new = json.loads(json.dumps(round_floats(summary)))
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and all(old.get(k) == v for k, v in new.items()):
        return
    path.write_text(json.dumps(new, indent=2))


def run_demo(out: Path, *, epochs: Optional[int] = None, seed: int = 0, samples: int = 100,
             defense: str = "jiio-at", skip_eval: bool = False, progress: bool = True, resume: bool = True,
             say: Optional[Callable[[str], None]] = None, device: Optional[str] = None, jobs: int = 1) -> dict:
    """Run the demo into the folder ``out``: train the undefended DEQ (``out/undefended``), then,
    unless ``skip_eval``, the model hardened with the recipe ``defense`` (``out/<defense>``),
    evaluate both on ``samples`` test digits (``out/eval_<name>``) and certify the undefended one
    (``out/certificate``). ``say`` receives what the demo is doing and its tables (default: the
    log). ``device``: where it trains, evaluates and certifies (None: the CPU, where the zoo
    builds the models). ``jobs=2`` evaluates the undefended model (from its checkpoint) in a
    second process while this one trains and evaluates the hardened model; the reports are the
    same as with ``jobs=1`` (the main process then reads the finished evaluation back from its
    folder). ``resume``: continue the trainings and evaluations found in ``out`` (False: train
    and evaluate again). Writes and returns the summary (``out/summary.json``)."""
    from .certify import certify
    from .defenses.recipes import recipe
    from .train import evaluate_clean, train_model
    if jobs not in (1, 2):
        raise ConfigError(f"jobs must be 1 or 2 (the demo evaluates two models), got {jobs!r}")
    say = say or logger.info
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_opts = dict(DEMO_TRAIN)
    if epochs is not None:
        train_opts["epochs"] = epochs
    if device is not None:
        train_opts["device"] = device
    say(f"training the undefended DEQ ({train_opts['epochs']} epochs) into {out / 'undefended'}")
    model, hist, (xt, yt) = train_model(DEMO_MODEL["name"], DEMO_MODEL["options"], train_opts,
                                        out_dir=out / "undefended", progress=progress,
                                        seed=seed, resume=resume)
    train_time = sum(h.get("epoch_time_s", 0.0) for h in hist)  # per-epoch compute (resume-safe)
    ev = evaluate_clean(model, xt, yt)
    summary = {
        "dataset": "digits", "model": DEMO_MODEL, "train": train_opts, "train_time_s": train_time,
        "test_accuracy": ev["accuracy"],
        "solver": {k: ev[k] for k in ("mean_steps", "converged_fraction", "mean_residual", "max_residual")},
        "checkpoint": str(out / "undefended" / "checkpoint.pt"),
        "tensorboard": str(out / "undefended" / "tb"),
    }
    say("== robustdeq demo: DEQ on scikit-learn digits ==")
    say(solver_table(summary))
    _write_training_summary(out / "summary.json", summary)
    if skip_eval:
        say(f"\nwrote {out / 'summary.json'}, {summary['checkpoint']}, TensorBoard log {summary['tensorboard']}")
        return summary

    n = min(samples, xt.shape[0])
    xs, ys = xt[:n], yt[:n]
    rec = recipe(defense, eps=0.1) if defense != "none" else recipe("none")
    what = "standard suite: native APGD, Square and intermediate-state attacks"
    second = None
    if jobs == 2:
        import torch
        say(f"\nevaluating the undefended model on {n} test samples ({what}) in a second process")
        second = _SecondProcess(_evaluate_checkpoint, summary["checkpoint"], xs, ys,
                                str(out / "eval_undefended"), device, torch.get_num_threads(), dict(DEMO_EVAL),
                                resume)
    if device is not None:
        xs, ys = xs.to(device), ys.to(device)
    try:
        # the hardened model: same architecture, trained with the chosen recipe
        hard_opts = dict(DEMO_MODEL["options"]) if rec.model is None else {"hidden": 128, "mean": 0.3, "std": 0.4}
        say(f"\ntraining the hardened model ({defense}, {train_opts['epochs']} epochs) into {out / defense}")
        hard, hhist, _ = train_model(rec.model or DEMO_MODEL["name"], hard_opts, train_opts,
                                     out_dir=out / defense, objective=rec.objective, progress=progress,
                                     seed=seed, resume=resume)
        summary["hardened"] = {"defense": defense, "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in hhist),
                               "test_accuracy": evaluate_clean(hard, xt, yt)["accuracy"],
                               "checkpoint": str(out / defense / "checkpoint.pt")}
        reports = {}
        here = [(defense, hard)] if second is not None else [("undefended", model), (defense, hard)]
        for name, m in here:
            say(f"\nevaluating the {name} model on {n} test samples ({what})")
            reports[name] = _evaluate(m, xs, ys, out / f"eval_{name}", progress, None, resume)
        if second is not None:
            say("\nwaiting for the undefended model's evaluation in the second process")
            second.result()
            # the finished evaluation, read back from its folder (nothing is attacked again)
            rep = _evaluate(model, xs, ys, out / "eval_undefended", False)
            redone = [a.key for r in rep.results for a in r.attacks if not a.resumed]
            if redone:
                logger.warning("the main process re-ran %s of the undefended model's evaluation",
                               ", ".join(redone))
            reports = {"undefended": rep, **reports}
    except BaseException:
        if second is not None:
            second.stop()
        raise
    tables = {name: demo_rows(rep) for name, rep in reports.items()}
    header = ["attack (accuracy after it, Linf)"] + [f"{name} eps {e}" for name in tables for e in tables[name]]
    labels = ["clean"] + [label for label, _ in DEMO_ROWS] + ["worst case"]
    rows = []
    for label in labels:
        row = [label]
        for name in tables:
            for e, col in tables[name].items():
                v = col.get(label)
                row.append("n/a" if v is None else f"{100 * v:.1f}%")
        rows.append(row)
    say(f"\n== robustness on {n} test samples (standard suite, cascaded: each row is the accuracy "
        "after that attack and every one above it) ==")
    say(text_table(rows, header))
    fired = {name: rep.fired for name, rep in reports.items() if rep.fired}
    if fired:
        say(f"checks that fired: {fired}")
    summary["robustness"] = {"samples": n, "tables": tables, "checks_fired": fired,
                             "reports": {name: str(out / f"eval_{name}") for name in reports}}

    # the Linf radii of the table above (interval bounds), so that the bracket certified <= robust
    # lines up, and small L2 radii (Lipschitz bounds), where a contractive DEQ certifies something
    cert = certify(model, xs, ys, eps_linf=DEMO_EPS, eps_l2=(0.02, 0.05, 0.1))
    cert.save(out / "certificate")
    summary["certificate"] = cert.summary
    say(f"\n== certificate of the undefended DEQ ({n} test samples) ==")
    say(cert.brief())
    say(certificate_note(cert.summary, tables.get("undefended", {})))
    (out / "summary.json").write_text(json.dumps(round_floats(summary), indent=2, default=str))
    say(f"\nwrote {out / 'summary.json'}, checkpoints, evaluation reports and TensorBoard logs under {out}")
    return summary


__all__ = ["DEMO_MODEL", "DEMO_TRAIN", "DEMO_EPS", "DEMO_EVAL", "DEMO_ROWS", "certificate_note", "default_model_options", "demo_rows", "solver_table",
           "run_demo"]
