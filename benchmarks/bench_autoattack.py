"""AutoAttack on a DEQ: pyautoattack on the plain model vs robustdeq's adapter with fast_deq and
with the per-sample warm-start memory, side by side in one run.

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

``--checkpoint NAME=PATH`` (repeatable) adds a trained model read from a robustdeq checkpoint
(``robustdeq.checkpoint.load_model``: ``weights_only=True``), attacked on the first ``--n``
images of ``--dataset`` (``mnist5k``: the MNIST-5k test split) at ``--eps``::

    python benchmarks/bench_autoattack.py --suites --dataset mnist5k --eps 0.3 --n 200 \
        --checkpoint pgd-at=ckpt/mnist-pgd-at/checkpoint.pt --checkpoint trades=ckpt/mnist-trades/checkpoint.pt

pyautoattack's per-sample results (robust flags, the stage that broke each sample, its CPU time)
are cached in ``--aa-cache`` (a JSON file, keyed by the model, its weights' hash, the data, n,
eps and seed) so that iterating on the suites does not pay AutoAttack again; a row whose
reference came from the cache says so (``--aa-cache ''``: always run it). Each suite row also
reports the black-box-stronger check (run on the suite's own results), which unit broke how
many samples, and the samples the ``unconverged_breaks`` check finds (broken only where the
model's solver stops unconverged: their equilibrium is classified correctly).

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
    ap.add_argument("--models", nargs="*", default=None,
                    choices=["undefended", "pgd-at", "contractive"],
                    help="digits models (default: all three, none when --checkpoint is given)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                    help="a model from a robustdeq checkpoint (repeatable)")
    ap.add_argument("--dataset", choices=("digits", "mnist5k"), default="digits",
                    help="test images of the --suites rows")
    ap.add_argument("--aa-cache", default="/tmp/robustdeq_bench_aa_cache.json",
                    help="JSON cache of pyautoattack's per-sample results ('' : no cache)")
    ap.add_argument("--at-epochs", type=int, default=5)
    ap.add_argument("--suite-names", nargs="*", default=["quick", "standard"])
    ap.add_argument("--aa-chunk", type=int, default=0,
                    help="run (and cache) pyautoattack on consecutive chunks of this many images "
                         "(0: all --n at once)")
    ap.add_argument("--reference-only", action="store_true",
                    help="with --suites: only compute (and cache) pyautoattack's reference")
    ap.add_argument("--suite-cache", default="",
                    help="JSON cache of the suites' per-sample results, keyed by the library's git "
                         "tree (uncommitted library changes are never cached; '': no cache)")
    ap.add_argument("--suite-seed", type=int, default=None,
                    help="--suites: the suites' seed (default --seed, which also seeds the models' "
                         "training and pyautoattack): the suites' variation over draws against one "
                         "reference")
    ap.add_argument("--suites-only", action="store_true",
                    help="with --suites: only run (and cache) the suites, no reference")
    args = ap.parse_args(argv)
    if args.n < 1 or args.aa_chunk < 0:
        ap.error("--n must be >= 1 and --aa-chunk >= 0")
    if (args.suites_only or args.reference_only) and not args.suites:
        ap.error("--suites-only and --reference-only go with --suites")
    if args.suites_only and args.reference_only:
        ap.error("--suites-only and --reference-only exclude each other")
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


def _suite_models(args):
    """(name, description, model) of every --suites row: the digits models, then checkpoints."""
    from robustdeq.checkpoint import load_model
    from robustdeq.errors import ConfigError
    kinds = args.models if args.models is not None else ([] if args.checkpoint else
                                                         ["undefended", "pgd-at", "contractive"])
    for kind in kinds:
        yield kind, f"{args.model} hidden {args.hidden}", _suite_model(kind, args)
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise ConfigError(f"--checkpoint takes NAME=PATH, got {item!r}")
        model, ckpt = load_model(path)
        yield name, f"{ckpt.model_config.get('name')} from {path}", model


def _weights_hash(model) -> str:
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _pyautoattack_reference(model, x, y, args):
    """pyautoattack standard called directly: (robust flags, stage that broke each sample, CPU s).

    The stage is recorded by wrapping the attacks' ``perturb``: with one batch (batch_size = n)
    every stage attacks the samples still robust, in index order; a sample counts as broken by a
    stage where the model's inference misclassifies the stage's output (pyautoattack's own rule).
    """
    from pyautoattack import AutoAttack as PyAutoAttack
    from robustdeq.attacks import predict
    aa = PyAutoAttack(model, norm="Linf", eps=args.eps, version="standard", seed=args.seed,
                      device=x.device)
    first = [None] * x.shape[0]
    robust = predict(model, x) == y
    for i in (~robust).nonzero().flatten().tolist():
        first[i] = "clean"

    def wrap(stage_of, fn):
        def perturb(xb, yb, *a, **k):
            out = fn(xb, yb, *a, **k)
            idx = robust.nonzero().flatten()
            assert idx.numel() == xb.shape[0], "one batch expected (batch_size = n)"
            with torch.no_grad():
                hit = predict(model, out) != yb
            for i in idx[hit].tolist():
                first[i] = stage_of()
            robust[idx[hit]] = False
            return out
        return perturb

    aa.apgd.perturb = wrap(lambda: f"apgd-{aa.apgd.loss}", aa.apgd.perturb)
    aa.apgd_targeted.perturb = wrap(lambda: "apgd-t", aa.apgd_targeted.perturb)
    aa.fab.perturb = wrap(lambda: "fab-t" if aa.fab.targeted else "fab", aa.fab.perturb)
    aa.square.perturb = wrap(lambda: "square", aa.square.perturb)
    c = time.process_time()
    with torch.random.fork_rng():
        adv = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])[0]
    t = time.process_time() - c
    final = predict(model, adv) == y
    if not torch.equal(final, robust):
        raise RuntimeError("pyautoattack's returned examples disagree with its per-stage record")
    return final, first, t


def _cached_reference(name, model, x, y, args):
    """:func:`_pyautoattack_reference`, through the JSON cache of ``--aa-cache``: (robust, first,
    CPU s, cached?). With ``--aa-chunk K`` the reference is run (and cached) on consecutive chunks
    of K images, each its own pyautoattack standard run; cached? is true if every chunk was."""
    k = args.aa_chunk if args.aa_chunk > 0 else x.shape[0]
    parts = [_cached_reference_chunk(name, model, x[i:i + k], y[i:i + k], args)
             for i in range(0, x.shape[0], k)]
    return (torch.cat([p[0] for p in parts]), sum((p[1] for p in parts), []),
            sum(p[2] for p in parts), all(p[3] for p in parts))


def _json_cached(path, key, compute):
    """``compute()`` (a JSON-able dict) through the JSON file ``path`` (None: no cache), keyed by
    ``key``: (entry, cached?). The file is re-read before writing and replaced atomically, so
    several processes may share it."""
    import json
    import os
    cache = json.loads(path.read_text()) if path is not None and path.exists() else {}
    if key in cache:
        return cache[key], True
    entry = compute()
    if path is not None:
        cache = json.loads(path.read_text()) if path.exists() else {}
        cache[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    return entry, False


def _data_key(name, model, x, y, args) -> str:
    import hashlib
    data = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    return f"{name}|{_weights_hash(model)}|{data}|n={x.shape[0]}|eps={args.eps}|seed={args.seed}"


def _cached_reference_chunk(name, model, x, y, args):
    from robustdeq.attacks.autoattack import pyautoattack_version

    def compute():
        robust, first, t = _pyautoattack_reference(model, x, y, args)
        return {"robust": robust.tolist(), "first": first, "cpu_s": t}
    e, cached = _json_cached(Path(args.aa_cache) if args.aa_cache else None,
                             f"{_data_key(name, model, x, y, args)}|pyautoattack {pyautoattack_version()}",
                             compute)
    return torch.tensor(e["robust"]), e["first"], e["cpu_s"], cached


def _code_commit():
    """The git tree hash of the library (``robustdeq/`` at HEAD: commits elsewhere keep it), or
    None if the library has uncommitted changes (or this is no checkout)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "robustdeq"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
        tree = subprocess.run(["git", "rev-parse", "HEAD:robustdeq"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if dirty else tree


def _suite_seed(args) -> int:
    return args.seed if args.suite_seed is None else args.suite_seed


def _cached_suite(name, model, x, y, suite, args):
    """One suite in cascade on (x, y), through the JSON cache of ``--suite-cache`` (keyed by the
    library's git tree): (robust flags, unit that broke each sample, CPU s, (check fired, message),
    cached?)."""
    from robustdeq.eval import evaluate
    from robustdeq.eval.checks import CheckConfig
    commit = _code_commit() if args.suite_cache else None
    if args.suite_cache and commit is None:
        print(f"# --suite-cache {args.suite_cache}: not used (robustdeq/ has uncommitted changes, "
              "or this is no git checkout)", file=sys.stderr, flush=True)

    def compute():
        c = time.process_time()
        rep = evaluate(model, x, y, eps=args.eps, suite=suite, cascade=True, checks=True,
                       check_config=CheckConfig(enabled=("black_box_stronger", "unconverged_breaks")),
                       seed=_suite_seed(args))
        t = time.process_time() - c  # the checks' solves included (a few seconds)
        res = rep.result()
        chk = next((c for c in rep.checks if c.name == "black_box_stronger"), None)
        ub = next((c for c in rep.checks if c.name == "unconverged_breaks"), None)
        return {"robust": list(res.robust), "first": list(res.first_success), "cpu_s": t,
                "check": [chk.fired if chk else None, chk.message if chk else ""],
                "solver_only": "skipped" if ub is None or ub.skipped else list(ub.details["samples"])}
    e, cached = _json_cached(Path(args.suite_cache) if commit else None,
                             f"{_data_key(name, model, x, y, args)}|{suite}|{commit}"
                             + ("" if _suite_seed(args) == args.seed else f"|suite seed {_suite_seed(args)}"),
                             compute)
    return (torch.tensor(e["robust"]), e["first"], e["cpu_s"], tuple(e["check"]),
            e.get("solver_only", "not recorded (an entry cached before the check)"), cached)


def _load_data(args):
    from robustdeq.data import load_digits, load_mnist5k
    xt, yt = (load_mnist5k if args.dataset == "mnist5k" else load_digits)("test")
    return xt[:args.n].float(), yt[:args.n]


def _count(names) -> dict:
    out = {}
    for who in names:
        if who not in (None, "clean"):
            out[who] = out.get(who, 0) + 1
    return out


def compare_suites(args) -> int:
    """robustdeq's native suites against pyautoattack standard, per model (module docstring)."""
    import logging
    from robustdeq.attacks import predict
    from robustdeq.attacks.autoattack import pyautoattack_version
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    x, y = _load_data(args)
    print(f"# native suites vs pyautoattack standard: torch {torch.__version__}, pyautoattack "
          f"{pyautoattack_version()}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s); first {args.n} {args.dataset} test images, Linf {args.eps}, "
          f"seed {args.seed}"
          f"{'' if _suite_seed(args) == args.seed else f' (the suites: seed {_suite_seed(args)})'}; "
          "suites cascaded, only the black-box-stronger and unconverged-breaks "
          "checks; CPU seconds")
    print()
    print("| model | clean | pyautoattack standard: robust / CPU s | suite | robust | CPU s | "
          "time vs pyautoattack | AA broke, suite left | suite broke, AA left |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name, what, model in _suite_models(args):
        clean_ok = predict(model, x) == y
        runs = {} if args.reference_only else {
            suite: _cached_suite(name, model, x, y, suite, args) for suite in args.suite_names}
        if args.suites_only:
            for suite, (robust, first, t, check, solver_only, cached) in runs.items():
                print(f"<!-- {name} {suite}: {float(robust.float().mean()):.3f} robust, {t:.1f} CPU s"
                      f"{' (cached)' if cached else ''}, first broken by {_count(first)}; broken only "
                      f"by an unconverged solve: {solver_only} -->", flush=True)
            continue
        aa_robust, aa_first, t_aa, cached = _cached_reference(name, model, x, y, args)
        aa_robust = aa_robust & clean_ok
        if args.reference_only:
            print(f"<!-- {name}: pyautoattack {float(aa_robust.float().mean()):.3f} robust, "
                  f"{t_aa:.1f} CPU s, first broken by {_count(aa_first)} -->", flush=True)
            continue
        ref = f"{float(aa_robust.float().mean()):.3f} / {t_aa:.1f}{' (cached)' if cached else ''}"
        notes.append(f"<!-- {name} ({what}): pyautoattack first broken by {_count(aa_first)}"
                     f"{'; reference read from ' + args.aa_cache if cached else ''} -->")
        for suite in args.suite_names:
            robust, first, t, check, solver_only, s_cached = runs[suite]
            missed = (robust & ~aa_robust).nonzero().flatten().tolist()
            print(f"| {name} | {float(clean_ok.float().mean()):.3f} | {ref} | {suite} | "
                  f"{float(robust.float().mean()):.3f} | {t:.1f}{' (cached)' if s_cached else ''} | "
                  f"{t / t_aa:.2f}x | {len(missed)} | {int((~robust & aa_robust).sum())} |", flush=True)
            notes.append(f"<!-- {name} {suite}: first broken by {_count(first)}; "
                         f"AA broke, suite left: {[(i, aa_first[i]) for i in missed]}; "
                         f"black_box_stronger: {check[0]} ({check[1]}); broken only by an "
                         f"unconverged solve (samples): {solver_only} -->")
            print(notes[-1], flush=True)
    print()
    print("\n".join(notes))
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
