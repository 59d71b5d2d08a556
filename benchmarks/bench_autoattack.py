"""AutoAttack on a DEQ: pyautoattack on the plain model vs robustdeq's adapter with fast_deq and
with the per-sample warm-start memory (issue 13), side by side in one run.

    python benchmarks/bench_autoattack.py [--repeats 2] [--n 256] [--model mlp_deq] [--hidden 64]
        [--contractive] [--version custom --attacks apgd-ce apgd-t] [--n-iter 100]
        [--n-queries 5000] [--n-target-classes 9] [--fast-options '{"adjoint_tol": 0.001}']

Trains the small DEQ of ``bench_attacks.py`` (same seed and steps), then runs, interleaved
``--repeats`` times on the same ``--n`` test digits (Linf eps 0.1, seed 0):

- ``pyautoattack.AutoAttack`` on the model itself (every call a cold solve, the IFT backward);
- ``robustdeq.attacks.AutoAttack(model, warm_memory=True)``: the same pyautoattack object, with
  the model wrapped in :class:`robustdeq.deq.memory.WarmMemory` for the run;
- ``robustdeq.attacks.AutoAttack(model, fast_deq=True)``: the model side made cheaper
  (:data:`robustdeq.deq.memory.FAST_OPTIONS`: the adjoint to an attack-grade tolerance, warm-started
  per sample from converged adjoints; forward warm starts only on a certified-contractive cell;
  repeated evaluations restarted from their converged state); ``--fast-options`` overrides some;
- ``robustdeq.attacks.AutoAttack(model, warm_memory=False)`` (the adapter's overhead alone).

With ``--suites``, instead: robustdeq's native suites (``quick``, ``standard``; cascaded, no
checks) against pyautoattack standard called directly on the same samples, for each model of
``--models`` (``undefended``: the model above; ``pgd-at``: the same architecture trained with
PGD-AT-7 at ``--eps`` for ``--at-epochs`` epochs; ``contractive``: spectral norm 0.9): CPU time
ratio, robust accuracy and the per-sample disagreements (samples pyautoattack broke that the
suite left, and the reverse)::

    python benchmarks/bench_autoattack.py --suites --n 200 --models undefended pgd-at contractive

The solver iterations of each row (forward and adjoint, batch iterations) are counted in one
extra untimed run per row.

AutoAttack's algorithm is untouched in every row (``--n-iter`` etc. set its documented budgets,
the same in every row). Robust accuracy is judged by the model's own cold inference on the
returned examples. Prints min-of-repeats CPU time, the ratio to pyautoattack (target <= 0.5) and
the robust-accuracy difference (target: within 1 sample in 100).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=("mlp_deq", "conv_deq"), default="mlp_deq")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--contractive", action="store_true")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--version", default="standard")
    ap.add_argument("--attacks", nargs="*", default=None)
    ap.add_argument("--n-iter", type=int, default=None, help="apgd / apgd_targeted n_iter")
    ap.add_argument("--n-queries", type=int, default=None, help="square n_queries")
    ap.add_argument("--n-target-classes", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast-options", default=None,
                    help="JSON dict overriding robustdeq.deq.memory.FAST_OPTIONS for the fast_deq row")
    ap.add_argument("--suites", action="store_true",
                    help="compare robustdeq's quick and standard suites with pyautoattack standard")
    ap.add_argument("--models", nargs="*", default=["undefended", "pgd-at", "contractive"],
                    choices=["undefended", "pgd-at", "contractive"])
    ap.add_argument("--at-epochs", type=int, default=5)
    ap.add_argument("--suite-names", nargs="*", default=["quick", "standard"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.suites:
        return compare_suites(args)
    warnings.simplefilter("ignore")
    import logging
    logging.getLogger("auto-attack").setLevel(logging.ERROR)

    from pyautoattack import AutoAttack as PyAutoAttack
    from bench_attacks import train_model
    from robustdeq.attacks import AutoAttack, accuracy
    from robustdeq.attacks.autoattack import pyautoattack_version
    from robustdeq.data import load_digits

    model = train_model(args.hidden, args.train_steps, args.seed, args.contractive, args.model)
    xt, yt = load_digits("test")
    x, y = xt[:args.n].float(), yt[:args.n]
    clean = accuracy(model, x, y)
    settings = {}
    if args.n_iter is not None:
        settings.update({"apgd.n_iter": args.n_iter, "apgd_targeted.n_iter": args.n_iter})
    if args.n_queries is not None:
        settings["square.n_queries"] = args.n_queries
    if args.n_target_classes is not None:
        settings.update({"apgd_targeted.n_target_classes": args.n_target_classes,
                         "fab.n_target_classes": args.n_target_classes})
    version = "custom" if args.attacks else args.version
    common = dict(eps=args.eps, version=version, attacks=args.attacks, seed=args.seed,
                  settings=settings, batch_size=args.n)

    def py_run():
        adv = PyAutoAttack(model, norm="Linf", eps=args.eps, version=version,
                           attacks=args.attacks if version == "custom" else None, seed=args.seed,
                           device=x.device)
        for k, v in settings.items():
            comp, _, attr = k.partition(".")
            setattr(getattr(adv, comp), attr, v)
        return adv.run_standard_evaluation(x, y, batch_size=args.n)[0]

    import json
    fast_opt = True if args.fast_options is None else json.loads(args.fast_options)
    fast = AutoAttack(model, fast_deq=fast_opt, **common)
    mem = AutoAttack(model, warm_memory=True, **common)
    plain = AutoAttack(model, warm_memory=False, **common)
    runs = {"pyautoattack on the model": py_run,
            "robustdeq AutoAttack (fast_deq)": lambda: fast(x, y),
            "robustdeq AutoAttack (warm memory)": lambda: mem(x, y),
            "robustdeq AutoAttack (no memory)": lambda: plain(x, y)}
    work = {k: _count_iterations(fn) for k, fn in runs.items()}
    cpu = {k: [] for k in runs}
    robust = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            c = time.process_time()
            with torch.random.fork_rng():
                x_adv = fn()
            cpu[k].append(time.process_time() - c)
            robust[k].append(accuracy(model, x_adv, y))
    print(f"# AutoAttack benchmark: torch {torch.__version__}, pyautoattack {pyautoattack_version()}, "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(f"# {args.model} {args.hidden}{' (spectral norm)' if args.contractive else ''}, clean "
          f"{clean:.3f} on {args.n} test digits; eps={args.eps}, version={version} "
          f"{args.attacks or ''} settings={settings}; {args.repeats} interleaved repeats, "
          f"robust accuracy by the model's cold inference")
    print()
    print("| run | CPU s (min, all) | robust acc (per repeat) | time vs pyautoattack | "
          "forward / adjoint solver iterations |")
    print("|---|---|---|---|---|")
    ref = min(cpu["pyautoattack on the model"])
    for k in runs:
        print(f"| {k} | {min(cpu[k]):.2f} ({', '.join(f'{t:.2f}' for t in cpu[k])}) | "
              f"{', '.join(f'{a:.4f}' for a in robust[k])} | {min(cpu[k]) / ref:.2f}x | "
              f"{work[k]['forward']} / {work[k]['adjoint']} |")
    print()
    for k in ("robustdeq AutoAttack (fast_deq)", "robustdeq AutoAttack (warm memory)"):
        gap = max(abs(a - b) for a in robust[k] for b in robust["pyautoattack on the model"]) * 100
        ratio = min(cpu[k]) / ref
        print(f"{k}: time ratio {ratio:.2f} (target <= 0.50: {'met' if ratio <= 0.5 else 'NOT met'}); "
              f"robust accuracy gap {gap:.2f} points (target <= 1 sample in 100: "
              f"{'met' if gap <= 1.0 else 'NOT met'})")
    print(f"fast_deq options: {fast.fast_deq}")
    print(f"fast_deq memory stats (last run): {getattr(fast, 'last_memory_stats', None)}")
    print(f"warm memory stats (last run): {getattr(mem, 'last_memory_stats', None)}")
    return 0


def _suite_model(kind: str, args):
    from bench_attacks import train_model
    if kind != "pgd-at":
        return train_model(args.hidden, args.train_steps, args.seed, kind == "contractive", args.model)
    import tempfile
    from robustdeq.config import TrainConfig
    from robustdeq.data import load_digits
    from robustdeq.defenses.recipes import recipe
    from robustdeq.deq import zoo
    from robustdeq.train import Trainer
    torch.manual_seed(args.seed)
    model = zoo.build(args.model, hidden=args.hidden)
    rec = recipe("pgd-at", eps=args.eps, steps=7)
    cfg = TrainConfig(epochs=args.at_epochs, batch_size=128, lr=1e-2, optimizer="adam",
                      schedule="cosine", seed=args.seed)
    x, y = load_digits("train")
    with tempfile.TemporaryDirectory() as d:
        Trainer(model, rec.objective, cfg, out_dir=d, tensorboard=False).fit(x, y)
    return model.eval()


def compare_suites(args) -> int:
    """robustdeq's native suites against pyautoattack standard, per model (module docstring)."""
    import logging
    from pyautoattack import AutoAttack as PyAutoAttack
    from robustdeq.attacks import predict
    from robustdeq.attacks.autoattack import pyautoattack_version
    from robustdeq.data import load_digits
    from robustdeq.eval import evaluate
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    xt, yt = load_digits("test")
    x, y = xt[:args.n].float(), yt[:args.n]
    print(f"# native suites vs pyautoattack standard: torch {torch.__version__}, pyautoattack "
          f"{pyautoattack_version()}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s); {args.model} hidden {args.hidden}, {args.n} test digits, "
          f"Linf {args.eps}, seed {args.seed}; suites cascaded, checks off; CPU seconds")
    print()
    print("| model | clean | pyautoattack standard: robust / CPU s | suite | robust | CPU s | "
          "time vs pyautoattack | AA broke, suite left | suite broke, AA left |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in args.models:
        model = _suite_model(kind, args)
        clean_ok = predict(model, x) == y
        c = time.process_time()
        with torch.random.fork_rng():
            adv = PyAutoAttack(model, norm="Linf", eps=args.eps, version="standard", seed=args.seed,
                               device=x.device).run_standard_evaluation(x, y, batch_size=args.n)[0]
        t_aa = time.process_time() - c
        aa_robust = (predict(model, adv) == y) & clean_ok
        for suite in args.suite_names:
            c = time.process_time()
            rep = evaluate(model, x, y, eps=args.eps, suite=suite, cascade=True, checks=False,
                           seed=args.seed)
            t = time.process_time() - c
            robust = torch.tensor(rep.result().robust)
            print(f"| {kind} | {float(clean_ok.float().mean()):.3f} | "
                  f"{float(aa_robust.float().mean()):.3f} / {t_aa:.1f} | {suite} | "
                  f"{float(robust.float().mean()):.3f} | {t:.1f} | {t / t_aa:.2f}x | "
                  f"{int((robust & ~aa_robust).sum())} | {int((~robust & aa_robust).sum())} |",
                  flush=True)
            by = {}
            for who in rep.result().first_success:
                if who not in (None, "clean"):
                    by[who] = by.get(who, 0) + 1
            print(f"<!-- {kind} {suite}: first broken by {by} -->", flush=True)
    return 0


def _count_iterations(fn) -> dict:
    """Batch iterations of every forward and adjoint solve of ``fn()`` (an untimed run): solves
    inside a backward pass are the adjoint ones."""
    from robustdeq.deq import shrink, solvers
    counts = {"forward": 0, "adjoint": 0}
    orig, orig_shrink = solvers.Solver.solve, shrink.solve_shrinking

    def kind() -> str:
        return "adjoint" if torch._C._current_graph_task_id() >= 0 else "forward"

    def solve(self, *a, **k):
        res = orig(self, *a, **k)
        counts[kind()] += int(res.nfe)
        return res

    def solve_shrinking(*a, **k):
        res = orig_shrink(*a, **k)
        counts[kind()] += int(res.nfe)
        return res
    solvers.Solver.solve, shrink.solve_shrinking = solve, solve_shrinking
    try:
        with torch.random.fork_rng():
            fn()
    finally:
        solvers.Solver.solve, shrink.solve_shrinking = orig, orig_shrink
    return counts


if __name__ == "__main__":
    sys.exit(main())
