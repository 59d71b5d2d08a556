"""Fidelity of the native attacks: robustdeq's APGD-CE, APGD-T and Square against pyautoattack's
on a model without a fixed-point solve, each attack separately, side by side in one run.

    python benchmarks/bench_fidelity.py [--n 200] [--epochs 10] [--seed 0] [--model mlp_deq]

Trains the zoo's feed-forward CNN (``ff_cnn``) on scikit-learn's digits (``--epochs`` epochs of
Adam, seed ``--seed``), then attacks its first ``--n`` test digits with AutoAttack's standard
budgets, the same seed for both implementations (0):

- APGD-CE: 100 iterations, 1 restart (``pyautoattack.autopgd_base.APGDAttack`` against
  ``robustdeq.attacks.APGD``);
- APGD-T: 100 iterations, the 9 targets of highest clean logit after the top one
  (``APGDAttack_targeted`` against ``APGDT``);
- Square: 5,000 queries, ``p_init`` 0.8, AutoAttack's absolute schedule (``SquareAttack(...,
  resc_schedule=False)`` against ``Square(rescale_schedule=False)``);

under Linf (eps 0.1) and L2 (eps 0.4). Each attack runs on every sample the model classifies
correctly (no cascade), and its examples are judged by the model. Printed per attack and threat
model: robust accuracy of each implementation, the samples on which their verdicts differ
(target: at most 1 in 200) and the CPU time of each. On a model without a fixed-point solve the
native attacks are meant to be the same algorithms (same step-size checkpoints, momentum and
restarts; Square's same random draws), so a difference is a bug, not a draw.

With ``--model mlp_deq`` the model is instead the small digits DEQ of ``bench_attacks.py`` (hidden
64, 100 training steps, seed ``--seed``), whose every forward is a fixed-point solve. pyautoattack
solves it cold at every step; the native APGD rows use ``method="exact", warm_start=False`` (the
same computation: the same verdicts expected), and extra rows show the default policy (the joint
forward/adjoint/input iteration), a different computation of the same algorithm: its time and
how many verdicts differ. Square queries the model's own inference by default (cold solves, as
pyautoattack does).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

THREATS = (("Linf", 0.1), ("L2", 0.4))


def train_cnn(epochs: int, seed: int):
    """The zoo's ff_cnn trained on digits (deterministic for a seed)."""
    import robustdeq as rd
    from robustdeq.data import load_digits
    from robustdeq.train import Trainer
    torch.manual_seed(seed)
    x, y = load_digits("train")
    model = rd.zoo.build("ff_cnn", in_shape=(1, 8, 8))
    Trainer(model, config={"epochs": epochs, "batch_size": 32, "lr": 3e-3, "seed": seed,
                           "optimizer": "adam"}).fit(x, y)
    return model.eval()


def attack_pairs(model, norm: str, eps: float, deq: bool = False):
    """(name, pyautoattack's attack, robustdeq's attack) for each attack; on a DEQ the native
    APGD units make pyautoattack's computation (cold exact solves), and the default policy's
    runs follow as extra rows."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.square import SquareAttack
    from robustdeq.attacks import APGD, APGDT, Square
    same = {"method": "exact", "warm_start": False} if deq else {}
    pairs = [
        ("APGD-CE",
         APGDAttack(model, n_iter=100, norm=norm, n_restarts=1, eps=eps, seed=0, loss="ce",
                    rho=0.75, device="cpu"),
         APGD(model, eps=eps, norm=norm, steps=100, restarts=1, loss="ce", seed=0, **same)),
        ("APGD-T",
         APGDAttack_targeted(model, n_iter=100, norm=norm, n_restarts=1, eps=eps, seed=0,
                             n_target_classes=9, rho=0.75, device="cpu"),
         APGDT(model, eps=eps, norm=norm, steps=100, n_target_classes=9, seed=0, **same)),
        ("Square",
         SquareAttack(model, p_init=0.8, n_queries=5000, eps=eps, norm=norm, n_restarts=1, seed=0,
                      device="cpu", resc_schedule=False),
         Square(model, eps=eps, norm=norm, n_queries=5000, p_init=0.8, rescale_schedule=False,
                seed=0)),
    ]
    if deq:  # the default policy: the joint iteration where the solves converge
        pairs += [
            ("APGD-CE (joint)", pairs[0][1],
             APGD(model, eps=eps, norm=norm, steps=100, restarts=1, loss="ce", seed=0)),
            ("APGD-T (joint)", pairs[1][1],
             APGDT(model, eps=eps, norm=norm, steps=100, n_target_classes=9, seed=0)),
        ]
    return pairs


def _timed(fn):
    c = time.process_time()
    out = fn()
    return out, time.process_time() - c


def _ratio(t: float, t_ref: float) -> str:
    return f"{t / t_ref:.2f}x" if t_ref > 0 else "n/a (reference took no measurable CPU time)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=None, help="ff_cnn's training epochs (10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=("ff_cnn", "mlp_deq"), default="ff_cnn")
    args = ap.parse_args(argv)
    if args.model == "mlp_deq" and args.epochs is not None:
        ap.error("--epochs is for --model ff_cnn (the mlp_deq is trained for 100 steps)")
    args.epochs = 10 if args.epochs is None else args.epochs
    if args.n < 1 or args.epochs < 1 or args.threads < 1:
        ap.error("--n, --epochs and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from robustdeq.attacks.base import logits_of
    from robustdeq.data import load_digits

    deq = args.model == "mlp_deq"
    if deq:
        from bench_attacks import train_model
        model = train_model(64, 100, args.seed)
        what = f"mlp_deq hidden 64 on digits, 100 steps (seed {args.seed})"
    else:
        model = train_cnn(args.epochs, args.seed)
        what = f"ff_cnn on digits, {args.epochs} epochs (seed {args.seed})"
    xt, yt = load_digits("test")
    x, y = xt[:args.n].float(), yt[:args.n]
    with torch.no_grad():
        correct = logits_of(model, x).argmax(1) == y
    xc, yc = x[correct], y[correct]
    n = x.shape[0]
    if not bool(correct.any()):
        print(f"{what}: no test digit among the first {n} is classified correctly; nothing to attack",
              file=sys.stderr)
        return 1
    print(f"{what}: clean {float(correct.float().mean()):.1%} "
          f"on the first {n} test digits; each attack on the {int(correct.sum())} correct ones\n")
    print("| threat | attack | pyautoattack: robust / CPU s | robustdeq: robust / CPU s | "
          "verdicts differ | time vs pyautoattack |")
    print("|---|---|---|---|---|---|")
    for norm, eps in THREATS:
        refs = {}  # pyautoattack's examples per attack object (a joint row reuses its reference)
        for name, ref, mine in attack_pairs(model, norm, eps, deq):
            def run_ref():
                with torch.random.fork_rng(), torch.no_grad() if name == "Square" else torch.enable_grad():
                    return ref.perturb(xc, yc)
            if id(ref) not in refs:
                refs[id(ref)] = _timed(run_ref)
            xa, t_ref = refs[id(ref)]
            xb, t_mine = _timed(lambda: mine(xc, yc))
            with torch.no_grad():
                ra = logits_of(model, xa).argmax(1) == yc
                rb = logits_of(model, xb).argmax(1) == yc
            diff = int((ra != rb).sum())
            print(f"| {norm} {eps:g} | {name} | {int(ra.sum()) / n:.1%} / {t_ref:.1f} | "
                  f"{int(rb.sum()) / n:.1%} / {t_mine:.1f} | {diff} of {n} | {_ratio(t_mine, t_ref)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
