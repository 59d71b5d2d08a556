"""Square attack on a converging DEQ: robustdeq's native Square with warm-started queries vs
pyautoattack's ``SquareAttack``, side by side in one run.

    python benchmarks/bench_square.py [--n 200] [--n-queries 300] [--eps 0.1] [--repeats 2]

Trains the small DEQ of ``bench_attacks.py`` (mlp_deq hidden 64 on digits, same seed and steps),
then runs, interleaved ``--repeats`` times on the same ``--n`` test digits (Linf, seed 0, p_init
0.8, the paper's rescaled p schedule in every row):

- ``pyautoattack.square.SquareAttack`` on the model (every query a cold solve);
- ``robustdeq.attacks.Square(warm_start=False)``: the same algorithm and random draws, cold
  solves (its examples equal pyautoattack's up to the solver's own batch effects);
- ``robustdeq.attacks.Square(speculate=32)``: cold solves, each query batch holding up to 32 of
  a sample's next proposals (the same decisions as one proposal per query, in fewer batches:
  the suites' setting);
- ``robustdeq.attacks.Square(warm_start=True)``: each query's forward solve warm-started from
  the converged fixed point of the sample's current best point (on this ``DEQClassifier`` by plain
  fixed-point iteration of its map, the model's solver finishing what it leaves); claimed
  misclassifications confirmed by cold inference.

Robust accuracy is judged by the model's own cold inference on the returned examples. Prints the
min-of-repeats CPU time, the ratio to pyautoattack and the forward iterations (solver or plain
fixed-point steps, summed over queried samples) of the robustdeq rows.
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
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--n-queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from pyautoattack.square import SquareAttack
    from bench_attacks import train_model
    from robustdeq.attacks import Square, accuracy
    from robustdeq.attacks.autoattack import pyautoattack_version
    from robustdeq.data import load_digits

    model = train_model(args.hidden, args.train_steps, args.seed, False, "mlp_deq")
    xt, yt = load_digits("test")
    x, y = xt[:args.n].float(), yt[:args.n]
    clean = accuracy(model, x, y)
    kw = dict(eps=args.eps, n_queries=args.n_queries, p_init=0.8, seed=args.seed)
    warm = Square(model, warm_start=True, rescale_schedule=True, **kw)
    cold = Square(model, warm_start=False, rescale_schedule=True, **kw)
    ahead = Square(model, warm_start=False, rescale_schedule=True, speculate=32, **kw)

    def py_run():
        ref = SquareAttack(model, norm="Linf", resc_schedule=True, device=x.device, **kw)
        with torch.no_grad():
            return ref.perturb(x, y)
    runs = {"pyautoattack SquareAttack": py_run,
            "robustdeq Square, cold solves": lambda: cold(x, y),
            "robustdeq Square, cold solves, speculate 32": lambda: ahead(x, y),
            "robustdeq Square, warm-started solves": lambda: warm(x, y)}
    cpu = {k: [] for k in runs}
    robust = {k: [] for k in runs}
    steps = {}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            c = time.process_time()
            with torch.random.fork_rng():
                x_adv = fn()
            cpu[k].append(time.process_time() - c)
            robust[k].append(accuracy(model, x_adv, y))
    steps["robustdeq Square, cold solves"] = cold.last_stats
    steps["robustdeq Square, cold solves, speculate 32"] = ahead.last_stats
    steps["robustdeq Square, warm-started solves"] = warm.last_stats
    print(f"# Square benchmark: torch {torch.__version__}, pyautoattack {pyautoattack_version()}, "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(f"# mlp_deq {args.hidden}, clean {clean:.3f} on {args.n} test digits; Linf eps={args.eps}, "
          f"{args.n_queries} queries, p_init 0.8, seed {args.seed}; {args.repeats} interleaved repeats; "
          "robust accuracy by the model's cold inference")
    print()
    print("| run | CPU s (min, all) | robust acc (per repeat) | time vs pyautoattack | "
          "forward-solver iterations (per-sample, summed) |")
    print("|---|---|---|---|---|")
    ref = min(cpu["pyautoattack SquareAttack"])
    for k in runs:
        st = steps.get(k)
        it = "n/a" if st is None else f"{st['solver_steps']}"
        print(f"| {k} | {min(cpu[k]):.2f} ({', '.join(f'{t:.2f}' for t in cpu[k])}) | "
              f"{', '.join(f'{a:.4f}' for a in robust[k])} | {min(cpu[k]) / ref:.2f}x | {it} |")
    print()
    print(f"warm-started run stats: {warm.last_stats}")
    gap = max(abs(a - b) for a in robust["robustdeq Square, warm-started solves"]
              for b in robust["pyautoattack SquareAttack"]) * 100
    print(f"warm-started Square: time ratio {min(cpu['robustdeq Square, warm-started solves']) / ref:.2f}, "
          f"robust accuracy gap {gap:.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
