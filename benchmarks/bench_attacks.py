"""robustdeq PGD-20 (warm start, IFT) vs torchattacks.PGD (20 steps) on the same DEQ and batch.

    python benchmarks/bench_attacks.py [--repeats 5] [--threads 1] [--hidden 64] [--batch 256]
        [--contractive] [--model mlp_deq|conv_deq|mdeq] [--quick] [--seed 0]

Trains a small ``mlp_deq`` (or ``conv_deq`` with ``--hidden`` channels) on scikit-learn's digits
(seconds; phantom gradient, 15 solver steps), takes a fixed batch of test samples, and runs,
interleaved ``--repeats`` times:

- robustdeq ``PGD(steps=20, grad="ift", method="exact")`` (the exact loop): each step warm-starts the forward
  solve from the previous step's fixed point and the adjoint solve from the previous adjoint
  (per sample, where those solves converged), on a batch that shrinks as samples converge;
- the same with ``early_stop=True``: a sample is frozen once the attack has succeeded at two
  consecutive iterates (on converged solves), confirmed by the model's own (cold) inference at the
  end, so the result is never weaker per sample than the plain loop's;
- ``torchattacks.PGD(steps=20)`` on the model as is (its forward: a cold solve and the implicit
  gradient's adjoint solve per step);
- ``PGD(steps=20)``, robustdeq's default (``method="auto"``): the joint
  forward/adjoint/input iteration carrying ``z`` and the adjoint across steps (a few solver
  iterations and adjoint sweeps per step), its final examples judged per sample by the model's
  own cold inference, for the samples whose first solve converges; the exact loop for the others
  (``--quick``: only this, the first row and torchattacks; the output says which ran);
- for reference, robustdeq PGD without warm start, and with an adjoint tolerance of 1e-3
  instead of the model's 1e-6, without and with early stopping (marked *: not the same gradient
  settings as torchattacks'; judged by the robust-accuracy criterion alone).

All with eps=0.1, alpha=0.01, random_start=False. Prints median/min time per attack, robust
accuracy and the time ratio (target: <= 0.33x torchattacks' time, min of repeats,
robust accuracy <= torchattacks' + 1 point). The joint row's solver counts are those of its loop;
the final cold evaluations of its candidates (the model's inference) are in its time, not in
those counts.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def train_model(hidden: int, steps: int, seed: int, contractive: bool = False,
                name: str = "mlp_deq"):
    from robustdeq.data import load_digits
    from robustdeq.deq import zoo
    from robustdeq.deq.grad import gradient
    torch.manual_seed(seed)
    if name == "conv_deq":
        options = {"channels": hidden}
        if contractive:
            options["norm"] = "spectral"
    elif name == "mdeq":  # the multiscale conv DEQ that converges (8x8 and 4x4 branches)
        options = {"in_shape": (1, 8, 8), "channels": (hidden, 2 * hidden), "stem_stride": 1, "pool": 2,
                   "mean": (0.3,), "std": (0.4,)}
    else:
        options = {"hidden": hidden}
        if contractive:
            options.update(norm="spectral", scale=0.9)
    model = zoo.build(name, **options)
    x, y = load_digits("train")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    fast = model.solver_config.replace(max_iter=15)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        with gradient(model, "phantom"):
            loss = F.cross_entropy(model.run(x[idx], solver=fast).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def count_solver_work(model, run) -> dict:
    """Solver iterations of ``run()`` (an untimed extra run): forward solves are those of
    ``model.solve``, the rest are the IFT adjoint solves."""
    from robustdeq.deq import solvers
    counts = {"forward_nfe": 0, "backward_nfe": 0, "forward_work": 0, "backward_work": 0}
    orig_solve, orig_model_solve = solvers.Solver.solve, model.solve
    inside = []

    def solver_solve(self, f, z0, *a, **k):
        res = orig_solve(self, f, z0, *a, **k)
        kind = "forward" if inside else "backward"
        counts[f"{kind}_nfe"] += res.nfe
        counts[f"{kind}_work"] += res.nfe * z0.shape[0]
        return res

    def model_solve(*a, **k):
        inside.append(1)
        try:
            return orig_model_solve(*a, **k)
        finally:
            inside.pop()
    solvers.Solver.solve = solver_solve
    model.solve = model_solve
    try:
        run()
    finally:
        solvers.Solver.solve = orig_solve
        del model.solve
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models run "
                    "fastest on one thread, and the timing is not disturbed by oversubscription)")
    ap.add_argument("--model", choices=("mlp_deq", "conv_deq", "mdeq"), default="mlp_deq")
    ap.add_argument("--hidden", type=int, default=64,
                    help="hidden units (mlp_deq) or channels (conv_deq)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the attacks run (training is on the CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="only the exact warm IFT PGD, torchattacks and the joint PGD")
    ap.add_argument("--contractive", action="store_true",
                    help="spectral-normalised cell (||W|| <= 0.9): every solve converges")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # non-convergence of a few samples is expected and shared

    import torchattacks
    from robustdeq.attacks import PGD, accuracy
    from robustdeq.config import BACKWARD_DEFAULT
    from robustdeq.data import load_digits
    from robustdeq.deq.grad import ImplicitGrad

    t0 = time.perf_counter()
    model = train_model(args.hidden, args.train_steps, args.seed, args.contractive, args.model)
    t_train = time.perf_counter() - t0
    xt, yt = load_digits("test")
    x, y = xt[:args.batch], yt[:args.batch]
    model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
    clean = accuracy(model, x, y)

    common = dict(eps=args.eps, alpha=args.alpha, steps=args.steps, random_start=False)
    joint_name = f"robustdeq PGD-{args.steps} (default: auto)"
    attacks = {
        f"robustdeq PGD-{args.steps} (exact, warm IFT)": PGD(model, grad="ift", method="exact", **common),
        f"torchattacks.PGD ({args.steps} steps)": torchattacks.PGD(model, **common),
        f"robustdeq PGD-{args.steps} (warm, IFT, early stop)": PGD(
            model, grad="ift", method="exact", early_stop=True, **common),
        f"robustdeq PGD-{args.steps} (no warm start, IFT)": PGD(model, grad="ift", warm_start=False, **common),
        # reference only: the same estimator with an attack-grade adjoint tolerance (not the
        # model's IFT setting that torchattacks uses): how much of the time the 1e-6 adjoint costs
        f"robustdeq PGD-{args.steps} (warm, adjoint tol 1e-3)*": PGD(
            model, grad=ImplicitGrad(BACKWARD_DEFAULT.replace(tol=1e-3)), **common),
        f"robustdeq PGD-{args.steps} (warm, adj. 1e-3, early stop)*": PGD(
            model, grad=ImplicitGrad(BACKWARD_DEFAULT.replace(tol=1e-3)), early_stop=True, **common),
        # the joint forward/adjoint/input iteration (robustdeq.deq.joint), its final
        # examples judged by the model's own cold inference
        joint_name: PGD(model, **common),
    }
    if args.quick:  # the exact warm IFT loop, torchattacks and the joint iteration only
        attacks = {k: v for i, (k, v) in enumerate(attacks.items()) if i < 2 or k == joint_name}
    times = {k: [] for k in attacks}
    cpu = {k: [] for k in attacks}
    robust = {}
    for k, atk in attacks.items():  # warm-up (first-call costs: imports, allocator)
        atk(x[:8], y[:8])
    for _ in range(args.repeats):
        for k, atk in attacks.items():
            t, c = time.perf_counter(), time.process_time()
            x_adv = atk(x, y)
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
            robust[k] = accuracy(model, x_adv, y)
    stats = {k: getattr(a, "last_stats", None) for k, a in attacks.items()}
    stats[f"torchattacks.PGD ({args.steps} steps)"] = count_solver_work(
        model, lambda: attacks[f"torchattacks.PGD ({args.steps} steps)"](x, y))

    ours, ref = list(attacks)[:2]
    print(f"# robustdeq attacks benchmark: torch {torch.__version__}, torchattacks "
          f"{torchattacks.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s)")
    print("# torchattacks runs the model's forward (cold Anderson solve + IFT adjoint solve) each "
          "step; 'sample-iters' counts f evaluations per sample (robustdeq's solves shrink the batch)")
    width = "channels" if args.model in ("conv_deq", "mdeq") else "hidden"
    print(f"# {args.model} {width}={args.hidden}{' (spectral norm)' if args.contractive else ''} (Anderson, tol 1e-3, 30 iters; IFT backward tol 1e-6), "
          f"trained {args.train_steps} steps in {t_train:.1f} s; clean accuracy {clean:.3f} on "
          f"{args.batch} test digits; eps={args.eps}, alpha={args.alpha}, steps={args.steps}, "
          f"random_start=False; {args.repeats} interleaved repeats")
    print()
    print(f"| {'attack':48s} | wall s (median, min) | CPU s (median, min) | robust acc | "
          f"solver iters fwd/bwd | sample-iters fwd/bwd | CPU time vs torchattacks |")
    print(f"|{'-' * 50}|----------------------|---------------------|------------|"
          f"----------------------|----------------------|--------------------------|")
    cpu_ref = statistics.median(cpu[ref])
    for k in attacks:
        st = stats[k]
        iters = f"{st['forward_nfe']}/{st['backward_nfe']}" if st else "n/a"
        work = f"{st['forward_work']}/{st['backward_work']}" if st else "n/a"
        print(f"| {k:48s} | {statistics.median(times[k]):9.3f}, {min(times[k]):8.3f} | "
              f"{statistics.median(cpu[k]):8.3f}, {min(cpu[k]):8.3f} | {robust[k]:10.3f} | {iters:>20s} | "
              f"{work:>20s} | {statistics.median(cpu[k]) / cpu_ref:23.2f}x |")
    print()
    names = list(attacks)
    for k in dict.fromkeys(n for n in (ours, *names[2:3], *names[5:6], joint_name) if n in attacks):
        ratio = statistics.median(cpu[k]) / cpu_ref
        wall_ratio = statistics.median(times[k]) / statistics.median(times[ref])
        min_ratio = min(cpu[k]) / min(cpu[ref])
        gap = (robust[k] - robust[ref]) * 100
        print(f"{k}: time ratio vs torchattacks CPU median {ratio:.2f}, CPU min-of-repeats "
              f"{min_ratio:.2f}, wall {wall_ratio:.2f} (target <= 0.33: "
              f"{'met' if min_ratio <= 0.33 else 'NOT met'}); robust accuracy gap "
              f"{gap:+.1f} points = {round(gap * args.batch / 100):+d} samples "
              f"(target <= +1 point: {'met' if gap <= 1 else 'NOT met'})")
    st = attacks[joint_name].last_stats
    split = (f" (joint on {st['joint_samples']}, exact on {st['exact_samples']} samples)"
             if "joint_samples" in st else "")
    print(f"{joint_name} ran: {', '.join(attacks[joint_name].last_methods)}{split}")
    print("* not the model's IFT settings: shows the cost of the 1e-6 adjoint tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
