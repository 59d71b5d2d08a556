"""Federated DEQ training on digits (Flower simulation engine, one CPU for the clients).

8 clients, Dirichlet(0.5) label skew, solver budgets 3/10/30 iterations (cycled over the clients):

1. FedAvg vs quality-weighted fusion: clean and robust accuracy (Linf eps 0.1, quick suite: PGD
   with IFT and unrolled gradients, on the first 100 test samples) of the global model per round.
   Target: quality-weighted at least as accurate as FedAvg at equal rounds.
2. Uplink bytes per round of the DEQs (mlp_deq, conv_deq) vs a feed-forward CNN (ff_cnn), and
   the uplink spent until the global model first reaches 90% test accuracy (equal accuracy).
   Target: DEQ uplink at most 0.5x the CNN's at equal accuracy.
3. Federated PGD-AT (quality fusion) vs centralised PGD-AT on the same training samples with the
   same total epochs: clean and robust accuracy.

Run: ``python benchmarks/bench_federated.py [--rounds 10]`` (about 10 minutes on 2 shared cores).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

from robustdeq.federated import FederatedConfig, federate
from robustdeq.federated.local import build_model, client_data
from robustdeq.federated.server import evaluate_global

TARGET = 0.90


def run(cfg: dict, root: Path, name: str):
    t0 = time.perf_counter()
    res = federate(cfg, root / name, progress=False, resume=False)
    return res, time.perf_counter() - t0


def bytes_to_target(rounds, target=TARGET):
    total = 0
    for r in rounds:
        total += r["bytes_up"]
        if r["accuracy"] >= target:
            return r["round"], total
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--at-rounds", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_fed_"))
    base = {"clients": 8, "rounds": args.rounds, "partition": "dirichlet:0.5", "budgets": [3, 10, 30],
            "eval_suite": "quick", "eval_samples": 100, "eval_eps": 0.1, "eval_steps": 10, "seed": 0}
    t_all = time.perf_counter()

    # 1. FedAvg vs quality-weighted fusion ------------------------------------------------------
    runs = {}
    for fusion in ("fedavg", "quality"):
        runs[fusion], sec = run({**base, "fusion": fusion}, root, fusion)
        print(f"[{fusion}] {sec:.0f} s")
    print("\n== 1. fusion under heterogeneous budgets (8 clients, budgets 3/10/30, Dirichlet 0.5, "
          "mlp_deq, CE) ==")
    print("| round | FedAvg acc | quality acc | FedAvg robust | quality robust |")
    print("|---|---|---|---|---|")
    for a, b in zip(runs["fedavg"].rounds, runs["quality"].rounds):
        print(f"| {a['round']} | {a['accuracy']:.4f} | {b['accuracy']:.4f} | "
              f"{a['robust_accuracy']:.3f} | {b['robust_accuracy']:.3f} |")
    wins = sum(b["accuracy"] >= a["accuracy"] for a, b in zip(runs["fedavg"].rounds, runs["quality"].rounds))
    print(f"quality >= FedAvg (clean) in {wins}/{len(runs['quality'].rounds)} rounds; "
          f"final {runs['quality'].final['accuracy']:.4f} vs {runs['fedavg'].final['accuracy']:.4f}")
    last = runs["quality"].final["clients"]
    print("weights in the last round (quality): " + ", ".join(
        f"c{c['client']}(b={c['budget']:.0f}, r={c['mean_residual']:.1e}, w={c['weight']:.3f})" for c in last))

    # 2. uplink bytes: DEQ vs CNN ------------------------------------------------------------------
    arch = {"mlp_deq": {}, "conv_deq": {"model": "conv_deq", "model_options": {"channels": 16}},
            "ff_cnn": {"model": "ff_cnn", "model_options": {"channels": 16, "blocks": 2}}}
    byte_runs = {"mlp_deq": runs["fedavg"]}
    for name in ("conv_deq", "ff_cnn"):
        byte_runs[name], sec = run({**base, "fusion": "fedavg", "eval_suite": "none", **arch[name]}, root, name)
        print(f"[{name}] {sec:.0f} s")
    print(f"\n== 2. uplink per round and until {TARGET:.0%} test accuracy (FedAvg, same split) ==")
    print("| model | parameters | bytes up / round | final accuracy | round reaching 90% | uplink until then |")
    print("|---|---|---|---|---|---|")
    up = {}
    for name, res in byte_runs.items():
        rnd, total = bytes_to_target(res.rounds)
        up[name] = total
        print(f"| {name} | {res.summary['model_parameters']:,} | {res.rounds[0]['bytes_up']:,} | "
              f"{res.final['accuracy']:.4f} | {rnd if rnd else 'not reached'} | "
              f"{f'{total:,}' if total else 'n/a'} |")
    common = min(max(r["accuracy"] for r in res.rounds) for res in byte_runs.values())
    common = int(common * 100) / 100
    print(f"uplink until every model's first round at >= {common:.2f} (the lowest peak accuracy of the three):")
    up_common = {}
    for name, res in byte_runs.items():
        rnd, total = bytes_to_target(res.rounds, common)
        up_common[name] = total
        print(f"  {name}: round {rnd}, {total:,} bytes")
    for name in ("mlp_deq", "conv_deq"):
        print(f"{name} / ff_cnn uplink at equal accuracy ({common:.2f}): "
              f"{up_common[name] / up_common['ff_cnn']:.2f}x (target <= 0.5x)")
        if up.get(name) and up.get("ff_cnn"):
            print(f"{name} / ff_cnn uplink at equal accuracy: {up[name] / up['ff_cnn']:.2f}x (target <= 0.5x)")
        per_round = byte_runs[name].rounds[0]["bytes_up"] / byte_runs["ff_cnn"].rounds[0]["bytes_up"]
        print(f"{name} / ff_cnn uplink per round: {per_round:.2f}x")

    # 3. federated vs centralised PGD-AT ------------------------------------------------------------
    at = {**base, "rounds": args.at_rounds, "fusion": "quality", "defense": "pgd-at",
          "defense_options": {"eps": 0.1, "steps": 5}}
    fed_at, sec = run(at, root, "pgd_at")
    print(f"[pgd-at federated] {sec:.0f} s")
    cfg = FederatedConfig.from_dict(at)
    shards = [client_data(cfg, k) for k in range(cfg.clients)]
    x = torch.cat([s.x_train for s in shards])
    y = torch.cat([s.y_train for s in shards])
    from robustdeq.data import load_digits
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
    xt, yt = load_digits("test")
    ev_c = evaluate_global(server_model, cfg, xt, yt)
    ev_f = fed_at.final
    print(f"\n== 3. PGD-AT (eps 0.1, 5 steps), {cfg.rounds} rounds x {cfg.local_epochs} local epoch vs "
          f"{cfg.rounds} centralised epochs on the same {x.shape[0]} samples ==")
    print("| training | clean accuracy | robust accuracy (quick, eps 0.1, 100 samples) | time (s) |")
    print("|---|---|---|---|")
    print(f"| federated (8 clients, budgets 3/10/30, quality) | {ev_f['accuracy']:.4f} | "
          f"{ev_f['robust_accuracy']:.3f} | {sec:.0f} |")
    print(f"| centralised (budget 30) | {ev_c['accuracy']:.4f} | {ev_c['robust_accuracy']:.3f} | "
          f"{central_sec:.0f} |")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; outputs under {root}")
    (root / "bench_federated.json").write_text(json.dumps({
        "fusion": {k: v.rounds for k, v in runs.items()},
        "bytes": {k: [{"round": r["round"], "accuracy": r["accuracy"], "bytes_up": r["bytes_up"]}
                      for r in v.rounds] for k, v in byte_runs.items()},
        "pgd_at": {"federated": ev_f, "centralised": ev_c}}, default=float, indent=1))


if __name__ == "__main__":
    main()
