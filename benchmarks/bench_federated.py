"""Federated DEQ training (Flower simulation engine, one CPU for the clients).

The issue's setting: 8 clients, Dirichlet(0.5) label skew, solver budgets 3/10/30 iterations
(cycled over the clients), 1 local epoch per round, on digits (``--dataset mnist5k`` for the 5,000
real MNIST images; a reduced run there).

Sections (``--only`` picks some):

``fusion``  FedAvg vs quality-weighted fusion (and the earlier ``tolerance`` rule) over several
    seeds (each seed draws its own Dirichlet split, initialisation and local shuffles): clean
    accuracy of the global model per round (whole test split), the mean over seeds, and the
    rounds in which each rule is at least as accurate as FedAvg; robust accuracy (Linf eps 0.1,
    ``quick`` suite, first 100 test samples) for the first ``--robust-seeds`` seeds.
    Target: quality-weighted at least as accurate as FedAvg at equal rounds.
``uplink``  Width sweep of the DEQ families (``mlp_deq`` hidden sizes; ``conv_deq`` channels;
    ``mdeq`` branch channels, for 28x28 inputs) and of
    the feed-forward CNN (``ff_cnn`` channels x blocks), FedAvg, same split and budgets: for a
    common target accuracy (``--targets``), the smallest bytes per round of each family that
    reaches it (its last-3-round mean accuracy >= target) and the uplink spent until the first
    round at the target. Target: DEQ uplink at most 0.5x the CNN's at equal accuracy.
``pgd-at``  Federated PGD-AT (quality fusion) vs centralised PGD-AT on the same training samples
    with the same total epochs: clean and robust accuracy.

Run: ``python benchmarks/bench_federated.py`` (digits, about 25 minutes on 2 shared cores).
Reduced MNIST-5k run (the one in RESULTS.md): ``--dataset mnist5k --rounds 10 --robust-seeds 0
--only fusion uplink --deq-widths 16 32 64 --conv-deq-widths --cnn-widths 8x1p4 16x1p4 16x2p4 32x2
--targets 0.80 0.85 0.90``, plus ``--only uplink --deq-widths --conv-deq-widths --mdeq-widths 8,16
--cnn-widths`` for the multiscale conv DEQ. ``--summarize JSON`` reprints the uplink tables of a
saved ``bench_federated.json`` (for other ``--targets``).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from robustdeq.federated import FederatedConfig, federate
from robustdeq.federated.local import build_model, client_data
from robustdeq.federated.server import evaluate_global

RULES = ("fedavg", "quality", "tolerance")


def run(cfg: dict, root: Path, name: str):
    t0 = time.perf_counter()
    res = federate(cfg, root / name, progress=False, resume=False)
    return res, time.perf_counter() - t0


def first_round_at(rounds, target):
    """(first round with accuracy >= target, uplink bytes spent up to and including it)."""
    total = 0
    for r in rounds:
        total += r["bytes_up"]
        if r["accuracy"] >= target:
            return r["round"], total
    return None, None


def tail_mean(rounds, k=3):
    return float(np.mean([r["accuracy"] for r in rounds[-k:]]))


# --------------------------------------------------------------------------------- 1. fusion
def bench_fusion(args, base, root) -> dict:
    acc: Dict[str, List[List[float]]] = {r: [] for r in RULES}
    robust: Dict[str, List[float]] = {}
    weights_last = {}
    for i, seed in enumerate(args.seeds):
        for rule in RULES:
            cfg = {**base, "fusion": rule, "seed": seed,
                   "eval_suite": "quick" if i < args.robust_seeds else "none"}
            res, sec = run(cfg, root, f"fusion_{rule}_s{seed}")
            acc[rule].append([r["accuracy"] for r in res.rounds])
            if i < args.robust_seeds:
                robust[rule] = [r["robust_accuracy"] for r in res.rounds]
            if i == 0:
                weights_last[rule] = res.final["clients"]
            print(f"[fusion {rule} seed {seed}] {sec:.0f} s, final {res.final['accuracy']:.4f}", flush=True)
    rounds = len(acc["fedavg"][0])
    mean = {r: np.mean(np.asarray(acc[r]), axis=0) for r in RULES}
    print(f"\n== 1. fusion under heterogeneous budgets ({base['clients']} clients, budgets "
          f"{'/'.join(map(str, base['budgets']))}, {base['partition']}, {base['dataset']}, seeds "
          f"{', '.join(map(str, args.seeds))}); clean accuracy, mean over seeds ==")
    print("| round | " + " | ".join(RULES) + " | " + " | ".join(f"{r} robust (seed {args.seeds[0]})" for r in robust) + " |")
    print("|---" * (1 + len(RULES) + len(robust)) + "|")
    for t in range(rounds):
        cells = [f"{mean[r][t]:.3f}" for r in RULES]
        cells += [f"{robust[r][t]:.2f}" for r in robust]
        print(f"| {t + 1} | " + " | ".join(cells) + " |")
    out = {"seeds": list(args.seeds), "accuracy": acc, "robust": robust}
    for rule in RULES[1:]:
        a, b = np.asarray(acc["fedavg"]), np.asarray(acc[rule])
        per_seed = [int((b[s] >= a[s]).sum()) for s in range(len(args.seeds))]
        wins_mean = int((mean[rule] >= mean["fedavg"]).sum())
        diff = b - a
        print(f"{rule} >= FedAvg: per seed {per_seed} of {rounds} rounds; on the seed mean "
              f"{wins_mean}/{rounds}; mean difference over rounds and seeds {diff.mean():+.4f} "
              f"(rounds {rounds // 2 + 1}-{rounds}: {diff[:, rounds // 2:].mean():+.4f}); final "
              f"{mean[rule][-1]:.4f} vs {mean['fedavg'][-1]:.4f}")
        out[f"{rule}_wins_per_seed"] = per_seed
        out[f"{rule}_wins_on_mean"] = wins_mean
    for rule in ("quality", "tolerance"):
        print(f"q_k / w_k in the last round ({rule}, seed {args.seeds[0]}): " + ", ".join(
            f"c{c['client']}(b={c['budget']:.0f}, r={c['mean_residual']:.1e}, "
            f"e={c.get('state_error', float('nan')):.2f}, q={c['quality']:.2f}, w={c['weight']:.3f})"
            for c in weights_last[rule]))
    return out


# --------------------------------------------------------------------------------- 2. uplink
def _parse_cnn(spec: str):
    """``"CxB"`` (channels x blocks, pool 2) or ``"CxBpP"`` (pooled to P x P before the head)."""
    c, rest = spec.lower().split("x")
    b, _, p = rest.partition("p")
    return {"channels": int(c), "blocks": int(b), **({"pool": int(p)} if p else {})}


def bench_uplink(args, base, root) -> dict:
    from robustdeq.federated.config import DEFAULT_MODEL_OPTIONS
    variants = []
    for h in args.deq_widths:
        variants.append(("mlp_deq", f"hidden {h}", {"model": "mlp_deq",
                                                    "model_options": {**DEFAULT_MODEL_OPTIONS, "hidden": h}}))
    for c in args.conv_deq_widths:
        variants.append(("conv_deq", f"{c} channels", {"model": "conv_deq", "model_options": {"channels": c}}))
    for spec in args.mdeq_widths:
        ch = [int(c) for c in spec.split(",")]
        variants.append(("mdeq", f"channels {'/'.join(map(str, ch))}", {"model": "mdeq", "model_options": {"channels": ch}}))
    for spec in args.cnn_widths:
        o = _parse_cnn(spec)
        label = f"{o['channels']} ch x {o['blocks']} block(s), pool {o.get('pool', 2)}"
        variants.append(("ff_cnn", label, {"model": "ff_cnn", "model_options": o}))
    rows = []
    for family, label, opts in variants:
        for seed in args.uplink_seeds:
            res, sec = run({**base, "fusion": "fedavg", "eval_suite": "none", "seed": seed, **opts},
                           root, f"uplink_{family}_{label.replace(' ', '_')}_s{seed}")
            rows.append({"family": family, "width": label, "seed": seed,
                         "parameters": res.summary["model_parameters"],
                         "bytes_per_round": res.rounds[0]["bytes_up"],
                         "accuracy": [r["accuracy"] for r in res.rounds],
                         "bytes_up": [r["bytes_up"] for r in res.rounds], "seconds": sec})
            print(f"[uplink {family} {label} seed {seed}] {sec:.0f} s, final {res.final['accuracy']:.4f}, "
                  f"last-3 mean {tail_mean(res.rounds):.4f}", flush=True)
    return summarize_uplink(rows, args.targets, args.uplink_seeds)


def summarize_uplink(rows, targets, seeds) -> dict:
    """The uplink table and, for every target accuracy, the cheapest width of each family."""
    print(f"\n== 2. uplink: width sweep, FedAvg, same split and budgets, seeds "
          f"{', '.join(map(str, seeds))} ==")
    head = " | ".join(f"first round >= {t:.2f} / uplink until then" for t in targets)
    print(f"| model | width | parameters | bytes up per round (8 clients) | final accuracy | last-3 mean | {head} |")
    print("|---" * (6 + len(targets)) + "|")
    for r in rows:
        rr = [{"round": i + 1, "accuracy": a, "bytes_up": b}
              for i, (a, b) in enumerate(zip(r["accuracy"], r["bytes_up"]))]
        r["tail_mean"] = tail_mean(rr)
        r["to_target"] = {}
        cells = []
        for t in targets:
            rnd, total = first_round_at(rr, t)
            r["to_target"][f"{t:.2f}"] = [rnd, total]
            cells.append("not reached" if rnd is None else f"{rnd} / {total:,}")
        width = r["width"] if len(seeds) == 1 else f"{r['width']} (seed {r['seed']})"
        print(f"| {r['family']} | {width} | {r['parameters']:,} | {r['bytes_per_round']:,} | "
              f"{r['accuracy'][-1]:.4f} | {r['tail_mean']:.4f} | " + " | ".join(cells) + " |")
    best: dict = {}
    families = list(dict.fromkeys(r["family"] for r in rows))
    deqs = [f for f in families if f != "ff_cnn"]
    print("\ncheapest width of each family reaching the target (last-3-round mean >= target, every "
          "seed) and the DEQ / CNN uplink ratio (target <= 0.5x):")
    print("| target | " + " | ".join(f"{f} (bytes per round)" for f in families) + " | "
          + " | ".join(f"{f} / ff_cnn per round | {f} / ff_cnn until the target" for f in deqs) + " |")
    print("|---" * (1 + len(families) + 2 * len(deqs)) + "|")
    for t in targets:
        key = f"{t:.2f}"
        best[key] = {}
        for family in dict.fromkeys(r["family"] for r in rows):
            widths: dict = {}
            for r in rows:
                if r["family"] == family:
                    widths.setdefault(r["width"], []).append(r)
            cands = [(v[0]["bytes_per_round"], w, v) for w, v in widths.items()
                     if all(x["tail_mean"] >= t for x in v)]
            if cands:
                bpr, w, v = min(cands, key=lambda c: c[0])
                ups = [x["to_target"][key][1] for x in v]
                best[key][family] = {"width": w, "bytes_per_round": bpr,
                                     "uplink_to_target": (float(np.mean(ups)) if all(u is not None for u in ups)
                                                          else None)}
                # the width needing the least uplink in all until its first round at the target
                totals = [(float(np.mean([x["to_target"][key][1] for x in v])), w2) for w2, v in widths.items()
                          if all(x["to_target"][key][1] is not None for x in v)]
                if totals:
                    tot, w2 = min(totals)
                    best[key][family]["least_total"] = {"width": w2, "uplink_to_target": tot}
        b = best[key]

        def ratio(a, c, field):
            if a in b and c in b and b[a][field] and b[c][field]:
                return f"{b[a][field] / b[c][field]:.2f}x"
            return "n/a"
        cells = [f"{b[f]['width']} ({b[f]['bytes_per_round']:,})" if f in b else "none reached"
                 for f in families]
        cells += [c for f in deqs for c in (ratio(f, "ff_cnn", "bytes_per_round"),
                                            ratio(f, "ff_cnn", "uplink_to_target"))]
        print(f"| {t:.2f} | " + " | ".join(cells) + " |")
    print("\nleast uplink in all until the first round at the target, over the widths of each family:")
    for key, b in best.items():
        parts = [f"{f}: {v['least_total']['uplink_to_target']:,.0f} ({v['least_total']['width']})"
                 for f, v in b.items() if "least_total" in v]
        for f in deqs:
            if f in b and "ff_cnn" in b and "least_total" in b[f] and "least_total" in b["ff_cnn"]:
                ratio_total = b[f]["least_total"]["uplink_to_target"] / b["ff_cnn"]["least_total"]["uplink_to_target"]
                parts.append(f"{f} / ff_cnn {ratio_total:.2f}x")
        print(f"  {key}: " + "; ".join(parts))
    return {"targets": list(targets), "rows": rows, "best": best}


# --------------------------------------------------------------------------------- 3. PGD-AT
def bench_pgd_at(args, base, root) -> dict:
    at = {**base, "rounds": args.at_rounds, "fusion": "quality", "defense": "pgd-at",
          "defense_options": {"eps": 0.1, "steps": 5}, "eval_suite": "quick"}
    fed_at, sec = run(at, root, "pgd_at")
    print(f"[pgd-at federated] {sec:.0f} s", flush=True)
    cfg = FederatedConfig.from_dict(at)
    shards = [client_data(cfg, k) for k in range(cfg.clients)]
    x = torch.cat([s.x_train for s in shards])
    y = torch.cat([s.y_train for s in shards])
    from robustdeq.data import load_dataset
    from robustdeq.defenses.recipes import recipe
    from robustdeq.train import Trainer
    torch.manual_seed(cfg.seed)
    central = build_model(cfg, budget=30)
    t0 = time.perf_counter()
    Trainer(central, recipe("pgd-at", eps=0.1, steps=5).objective,
            {"epochs": cfg.rounds * cfg.local_epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
             "schedule": "constant", "seed": cfg.seed}, tensorboard=False).fit(x, y)
    central_sec = time.perf_counter() - t0
    server_model = build_model(cfg)
    server_model.load_state_dict(central.state_dict())
    xt, yt = load_dataset(cfg.dataset, "test")
    ev_c = evaluate_global(server_model, cfg, xt, yt)
    ev_f = fed_at.final
    print(f"\n== 3. PGD-AT (eps 0.1, 5 steps), {cfg.rounds} rounds x {cfg.local_epochs} local epoch vs "
          f"{cfg.rounds} centralised epochs on the same {x.shape[0]} samples ==")
    print("| training | clean accuracy | robust accuracy (quick, eps 0.1, 100 samples) | time (s) |")
    print("|---|---|---|---|")
    print(f"| federated (8 clients, budgets {'/'.join(map(str, cfg.budgets))}, quality) | {ev_f['accuracy']:.4f} | "
          f"{ev_f['robust_accuracy']:.3f} | {sec:.0f} |")
    print(f"| centralised (budget 30) | {ev_c['accuracy']:.4f} | {ev_c['robust_accuracy']:.3f} | "
          f"{central_sec:.0f} |")
    return {"federated": ev_f, "centralised": ev_c, "seconds": {"federated": sec, "centralised": central_sec}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--budgets", default="3,10,30", help="solver budgets cycled over the 8 clients")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the fusion comparison")
    ap.add_argument("--robust-seeds", type=int, default=1, help="seeds (the first ones) with robust evaluation")
    ap.add_argument("--uplink-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--deq-widths", type=int, nargs="*", default=[8, 16, 24, 32, 64], help="mlp_deq hidden sizes")
    ap.add_argument("--conv-deq-widths", type=int, nargs="*", default=[8, 16], help="conv_deq channels")
    ap.add_argument("--mdeq-widths", nargs="*", default=[],
                    help="multiscale conv DEQ branch channels, e.g. 8,16 (for 28x28 inputs: --dataset mnist5k)")
    ap.add_argument("--cnn-widths", nargs="*",
                    default=["4x1", "8x1", "8x2", "16x2", "32x2", "4x1p4", "8x1p4", "16x1p4", "16x2p4"],
                    help="ff_cnn CHANNELSxBLOCKS[pPOOL] (pool: side of the average pooling before the head, default 2)")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.90, 0.93],
                    help="common target accuracies of the uplink section")
    ap.add_argument("--summarize", default=None, metavar="JSON",
                    help="only print the uplink summary of an earlier run's bench_federated.json")
    ap.add_argument("--at-rounds", type=int, default=12)
    ap.add_argument("--only", nargs="+", choices=["fusion", "uplink", "pgd-at"], default=["fusion", "uplink", "pgd-at"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.summarize:
        data = json.loads(Path(args.summarize).read_text())
        summarize_uplink(data["uplink"]["rows"], args.targets, data["args"]["uplink_seeds"])
        return
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_fed_"))
    root.mkdir(parents=True, exist_ok=True)
    base = {"clients": 8, "rounds": args.rounds, "partition": "dirichlet:0.5",
            "budgets": [int(b) for b in args.budgets.split(",")],
            "eval_samples": 100, "eval_eps": 0.1, "eval_steps": 10, "seed": 0, "dataset": args.dataset}
    t_all = time.perf_counter()
    results = {"args": vars(args)}
    if "fusion" in args.only:
        results["fusion"] = bench_fusion(args, base, root)
    if "uplink" in args.only:
        results["uplink"] = bench_uplink(args, base, root)
    if "pgd-at" in args.only:
        results["pgd_at"] = bench_pgd_at(args, base, root)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; outputs under {root}")
    (root / "bench_federated.json").write_text(json.dumps(results, default=float, indent=1))


if __name__ == "__main__":
    main()
