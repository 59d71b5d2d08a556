"""Several processes (robustdeq.distributed): ranks spawned by the tests on CPU with gloo over
127.0.0.1. The fast tests (environment errors, sharding, one 2-rank smoke test of the helpers)
run by default; the 2-rank training / evaluation / certification (deterministic and randomized
smoothing) equivalences are marked slow."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from robustdeq import distributed as rd
from robustdeq.errors import ConfigError

from helpers import ranks

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# -- spawning ------------------------------------------------------------------------------------
def spawn(task: str, out: Path, world: int = 2, **kwargs) -> list:
    """Run ``TASKS[task](rank, out, **kwargs)`` on ``world`` spawned ranks; their results."""
    return ranks.spawn(TASKS[task], out, world, **kwargs)


# -- tasks run on each rank --------------------------------------------------------------------------
def _task_helpers(rank, out):
    ctx = rd.init()
    assert ctx is not None and ctx.world_size == 2 and ctx.rank == rank and rd.context() == ctx
    # gradients: weights = samples per rank; a parameter unused on rank 1 keeps rank 0's share,
    # one unused everywhere keeps None
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), float(rank + 1))
    if rank == 0:
        b.grad = torch.ones(3)
    extra = rd.average_gradients([a, b, c], weight=float(rank + 1), total=3.0,
                                 extra=torch.tensor([float(rank)], dtype=torch.float64))
    rows = rd.all_gather_rows(torch.arange(rank + 1, dtype=torch.float32).view(-1, 1) + 10 * rank)
    stats = rd.reduce_stats({"n": 1.0, "m": float(rank)}, maxima=("m",))
    ts = [torch.full((2, 3), float(rank)).t(), torch.full((2,), float(rank)), torch.full((1,), rank)]
    rd.broadcast_tensors(ts, src=1)  # coalesced per dtype; a non-contiguous tensor too
    bcast = [t.clone() for t in ts]
    claimed = list(rd.claim(range(7)))  # dynamic shares: disjoint, together every item once
    merged = rd.gather_sharded([(i, rank) for i in claimed])
    try:  # a failure on rank 1 is raised on both ranks (rank 0 does not wait for it)
        rd.gather_sharded([rank], ConfigError("rank 1 broke") if rank == 1 else None)
        failure = None
    except ConfigError as e:
        failure = str(e)
    calls = []  # run_on_main: rank 0 alone runs it; its result there, None elsewhere; its error everywhere
    on_main = rd.run_on_main(lambda: calls.append(rank) or "made")
    try:
        rd.run_on_main(lambda: (_ for _ in ()).throw(ConfigError("rank 0 refused")))
        main_failure = None
    except ConfigError as e:
        main_failure = str(e)
    return {"on_main": (on_main, calls), "main_failure": main_failure, "a": a.grad, "b": b.grad, "c": c.grad, "extra": extra, "rows": rows, "stats": stats,
            "shard": rd.shard_indices(5), "main": rd.is_main(), "obj": rd.broadcast_object(rank),
            "claimed": claimed, "merged": merged, "failure": failure, "bcast": bcast}


def _tiny_model(spectral: bool = False):
    """``spectral``: spectral-normalised cell, whose power-iteration buffers advance with every
    training forward (the buffers the trainer re-synchronises)."""
    from robustdeq.deq import zoo
    torch.manual_seed(0)
    return zoo.build("mlp_deq", hidden=16, **({"norm": "spectral", "scale": 0.9} if spectral else {}))


def _objective(kind: str):
    from robustdeq.defenses.objectives import PGDAT, CrossEntropy
    if kind.startswith("pgd_at"):  # deterministic inner attack: the same examples in 1 or 2 processes
        return PGDAT(eps=0.1, steps=3, random_start=False)
    if kind == "jac":
        return CrossEntropy(jac_reg=0.5, seed=3)
    return CrossEntropy()


TRAIN_CONFIG = {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.5, "schedule": "constant"}


def _train_data():
    from robustdeq.data import load_digits
    x, y = load_digits("train")
    return x[:32], y[:32]


def _task_train(rank, out, kind="ce", config=None, out_dirs=False):
    from robustdeq.train import Trainer
    model = _tiny_model(spectral=kind.endswith("spectral"))
    x, y = _train_data()
    tr = Trainer(model, _objective(kind), config or TRAIN_CONFIG,
                 out_dir=out / f"run{rank}" if out_dirs else None, tensorboard=out_dirs)
    hist = tr.fit(x, y, x[:10], y[:10])
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "history": hist}


class _Interrupt(Exception):
    pass


def _task_train_resume(rank, out):
    """2 epochs in one go, and 2 epochs interrupted in epoch 1 then resumed: the same weights."""
    from robustdeq.defenses.objectives import CrossEntropy
    from robustdeq.train import Trainer
    x, y = _train_data()
    cfg = {**TRAIN_CONFIG, "epochs": 2, "optimizer": "adam", "lr": 1e-2, "schedule": "cosine"}
    straight = _tiny_model()
    Trainer(straight, CrossEntropy(), cfg, out_dir=out / "straight", tensorboard=False).fit(x, y)

    calls = {"n": 0}

    class Stop(CrossEntropy):
        def __call__(self, model, xb, yb):
            calls["n"] += 1
            if calls["n"] == 3:  # epoch 1, batch 0, on both ranks
                raise _Interrupt()
            return super().__call__(model, xb, yb)

    cut = _tiny_model()
    try:
        Trainer(cut, Stop(), cfg, out_dir=out / "cut", tensorboard=False).fit(x, y)
    except _Interrupt:
        pass
    resumed = _tiny_model()
    tr = Trainer(resumed, CrossEntropy(), cfg, out_dir=out / "cut", tensorboard=False)
    hist = tr.fit(x, y)
    return {"straight": straight.state_dict(), "resumed": resumed.state_dict(), "history": hist,
            "start_epoch": tr.start_epoch}


def _task_train_killed(rank, out, kill=False):
    """2 epochs with a checkpoint folder; ``kill``: rank 1 is killed (SIGKILL) in epoch 1."""
    import signal
    from robustdeq.defenses.objectives import CrossEntropy
    from robustdeq.train import Trainer
    x, y = _train_data()
    calls = {"n": 0}

    class Killed(CrossEntropy):
        def __call__(self, model, xb, yb):
            calls["n"] += 1
            # epoch 1, batch 1: rank 0 is past the all-reduce of epoch 1's batch 0, so it saved epoch 0
            if kill and rank == 1 and calls["n"] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(model, xb, yb)

    model = _tiny_model()
    tr = Trainer(model, Killed(), KILL_CONFIG, out_dir=out / "run", tensorboard=False)
    hist = tr.fit(x, y)
    return {"state": model.state_dict(), "history": hist, "start_epoch": tr.start_epoch}


KILL_CONFIG = {**TRAIN_CONFIG, "epochs": 2, "optimizer": "adam", "lr": 1e-2, "schedule": "cosine"}


def _task_eval_killed(rank, out, kill=False):
    """evaluate with an out_dir; ``kill``: rank 1 is killed (SIGKILL) after its second unit."""
    import signal
    from robustdeq.eval import evaluate
    model, x, y = _eval_inputs(out)

    def callback(info):
        if kill and rank == 1 and info["eps_index"] == 0 and info["unit_index"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    rep = evaluate(model, x, y, out_dir=out / "killed", callback=callback, **EVAL_OPTIONS)
    return {"report": rep.to_dict()}


def _save_inputs(out: Path, model, x, y) -> None:
    from robustdeq.checkpoint import save_checkpoint
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", model, model_config=model.robustdeq_config)
    torch.save((x, y), out / "data.pt")


def _eval_inputs(out):
    from robustdeq.checkpoint import load_model
    model, _ = load_model(out / "model.pt")
    x, y = torch.load(out / "data.pt")
    return model.eval(), x, y


EVAL_OPTIONS = {"threat": "Linf", "eps": [0.05, 0.15], "suite": ["pgd-ift", "pgd-unrolled-margin", "states"],
                "steps": 5, "seed": 3, "batch_size": 8}


def _task_eval(rank, out, out_dirs=False, interrupt_after=None):
    from robustdeq.eval import evaluate
    model, x, y = _eval_inputs(out)
    res = {}
    if interrupt_after is not None:  # both ranks stop after a few units; rank 0 kept them
        def stop(info):
            if info["eps_index"] * 10 + info["unit_index"] >= interrupt_after:
                raise _Interrupt()
        try:
            evaluate(model, x, y, out_dir=out / f"eval{rank}", callback=stop, **EVAL_OPTIONS)
        except _Interrupt:
            pass
        res["partial_files"] = sorted(p.name for p in (out / f"eval{rank}" / "partial").glob("*.json")) \
            if (out / f"eval{rank}" / "partial").is_dir() else []
    rep = evaluate(model, x, y, out_dir=out / f"eval{rank}" if out_dirs else None, **EVAL_OPTIONS)
    res["report"] = rep.to_dict()
    return res


def _task_certify(rank, out):
    """Inside a process group the caller initialised (no torchrun environment)."""
    from robustdeq.certify import certify
    port = os.environ["MASTER_PORT"]
    for v in TORCHRUN_VARS:
        os.environ.pop(v)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, x, y = _eval_inputs(out)
    rep = certify(model, x, y, eps_l2=(0.05, 0.1), batch_size=4, local_method="power", local_iters=20).to_dict()
    from robustdeq.certify import certify_checkpoint
    certify_checkpoint(out / "model.pt", n_inputs=4, out_dir=out / f"cert{rank}", batch_size=2, local_method="power",
                       local_iters=5)
    return rep


SMOOTHING_OPTIONS = {"plain": {"sigma": 0.25, "n0": 20, "n": 100, "batch_size": 50, "seed": 5},
                     "srs": {"sigma": 0.25, "n0": 20, "n": 100, "batch_size": 25, "seed": 5, "srs_steps": 2,
                             "check_samples": 30},
                     "sequential": {"sigma": 0.25, "n0": 20, "n": 400, "batch_size": 50, "seed": 5,
                                    "mode": "sequential", "radii": (0.1, 0.3)}}


def _task_smoothing(rank, out):
    """Randomized smoothing (plain and SRS) under torchrun's environment; counts the inputs this
    rank certified; certify_checkpoint writes on rank 0 only."""
    from robustdeq.certify import smoothing as S
    from robustdeq.certify.smoothing import engine
    model, x, y = _eval_inputs(out)
    calls = []
    one = engine._certify_one

    def counted(base, x1, index, cfg):
        calls.append(index)
        return one(base, x1, index, cfg)

    engine._certify_one = counted
    try:
        reps = {k: S.certify(model, x, y, **o).to_dict() for k, o in SMOOTHING_OPTIONS.items()}
    finally:
        engine._certify_one = one
    pred = S.predict(model, x, sigma=0.25, n=60, batch_size=60, seed=2)
    from robustdeq.certify import certify_checkpoint
    certify_checkpoint(out / "model.pt", "smoothing", n_inputs=4, out_dir=out / f"smooth{rank}",
                       **SMOOTHING_OPTIONS["plain"])
    return {"reports": reps, "calls": calls, "predict": pred}


class _Stop(Exception):
    """The interruption of a certification (raised by the patched per-batch / per-input function)."""


@contextlib.contextmanager
def _resume_warnings():
    """The messages ``robustdeq.certify.resume`` logs as warnings inside the block."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("robustdeq.certify.resume").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("robustdeq.certify.resume").removeHandler(handler)


#: certify_checkpoint's options, the per-unit function and the position of its unit's index
RESUME_CASES = {"deterministic": ({"n_inputs": 8, "batch_size": 2, "local_method": "power", "local_iters": 5},
                                  "robustdeq.certify.api", "_certify_batch", 1),
                "smoothing": ({"n_inputs": 6, **SMOOTHING_OPTIONS["plain"]},
                              "robustdeq.certify.smoothing.engine", "_certify_one", 2)}


def _task_certify_resume(rank, out):
    """certify_checkpoint interrupted on both ranks after one unit each (a batch, an input), then
    rerun on the same folder: the units each run computed, the files left, the reports, the
    warnings about files of other process layouts."""
    import importlib
    from robustdeq.certify import certify_checkpoint
    res = {}
    for method, (opts, module, name, at) in RESUME_CASES.items():
        mod = importlib.import_module(module)
        orig = getattr(mod, name)
        folder = out / method
        runs = {"cut": [], "rerun": []}
        stop = [True]

        def patched(*args, runs=runs, stop=stop, orig=orig, at=at):
            calls = runs["cut" if stop[0] else "rerun"]
            if stop[0] and len(calls) == 1:  # this rank's second unit
                raise _Stop(f"rank {rank}")
            calls.append(int(args[at]))
            return orig(*args)
        setattr(mod, name, patched)
        try:
            with _resume_warnings() as warned:
                try:  # the folder holds a killed one-process run's file: discarded
                    certify_checkpoint(out / "model.pt", method, out_dir=folder, **opts)
                    raise AssertionError("not interrupted")
                except _Stop:
                    pass
                left = sorted(p.name for p in folder.iterdir())
                dist.barrier()
                if rank == 0:  # a file of a run on 3 processes: discarded
                    stem = "partial_certify" if method == "deterministic" else "partial_smoothing"
                    (folder / f"{stem}.rank2-of-3.jsonl").write_text('{"config_hash": "x"}\n')
                dist.barrier()
                stop[0] = False
                rep = certify_checkpoint(out / "model.pt", method, out_dir=folder, **opts).to_dict()
        finally:
            setattr(mod, name, orig)
        dist.barrier()
        uninterrupted = certify_checkpoint(out / "model.pt", method, **opts).to_dict()
        res[method] = {"runs": runs, "left": left, "after": sorted(p.name for p in folder.iterdir()),
                       "report": rep, "uninterrupted": uninterrupted, "warnings": warned,
                       "saved": json.loads((folder / "certificate.json").read_text())}
    return res


#: certify(ff_mlp) on 10 inputs (batches 0, 4, 8: rank 0 certifies two, rank 1 one) and
#: certify_checkpoint on 8 (batches 0, 2, 4, 6)
FF_OPTIONS = {"eps_linf": (0.001, 0.05), "eps_l2": ()}
FF_CHECKPOINT_OPTIONS = {"n_inputs": 8, "batch_size": 2, **FF_OPTIONS}


def _task_certify_feedforward(rank, out):
    """certify on a feed-forward network (the batches this rank computed), then certify_checkpoint
    interrupted on both ranks after one batch each (its folder holding a killed one-process run's
    file) and rerun: the batches each run computed, the files left, the reports, the warnings,
    the folder as each rank found it when it opened its own file (rank 0 discards slowly)."""
    import time
    from robustdeq.checkpoint import load_model
    from robustdeq.certify import certify, certify_checkpoint, feedforward, resume
    model, _ = load_model(out / "ff.pt")
    x, y = torch.load(out / "ff_data.pt")
    folder = out / "ffcert"
    orig, discard, open_file = feedforward._feedforward_batch, resume._discard_other_layouts, \
        resume.PartialResults.__init__
    runs = {"certify": [], "cut": [], "rerun": []}
    phase, opened = ["certify"], []

    def counted(*args):
        calls = runs[phase[0]]
        if phase[0] == "cut" and len(calls) == 1:  # this rank's second batch
            raise _Stop(f"rank {rank}")
        calls.append(int(args[4]))
        return orig(*args)

    def slow_discard(*args):  # the other rank must wait for it
        time.sleep(0.5)
        discard(*args)

    def opening(self, out_dir, *args, **kwargs):
        opened.append(sorted(p.name for p in Path(out_dir).iterdir()))
        open_file(self, out_dir, *args, **kwargs)
    feedforward._feedforward_batch, resume._discard_other_layouts = counted, slow_discard
    resume.PartialResults.__init__ = opening
    try:
        with _resume_warnings() as warned:
            rep = certify(model.eval(), x, y, batch_size=4, **FF_OPTIONS).to_dict()
            phase[0] = "cut"
            try:
                certify_checkpoint(out / "ff.pt", out_dir=folder, **FF_CHECKPOINT_OPTIONS)
                raise AssertionError("not interrupted")
            except _Stop:
                pass
            left = sorted(p.name for p in folder.iterdir())
            phase[0] = "rerun"
            resumed = certify_checkpoint(out / "ff.pt", out_dir=folder, **FF_CHECKPOINT_OPTIONS).to_dict()
    finally:
        feedforward._feedforward_batch, resume._discard_other_layouts = orig, discard
        resume.PartialResults.__init__ = open_file
    dist.barrier()  # both ranks removed their files
    return {"report": rep, "runs": runs, "left": left, "resumed": resumed, "warnings": warned,
            "after": sorted(p.name for p in folder.iterdir()), "opened": opened}


TASKS = {"helpers": _task_helpers, "smoothing": _task_smoothing, "train_killed": _task_train_killed,
         "eval_killed": _task_eval_killed, "train": _task_train, "train_resume": _task_train_resume,
         "eval": _task_eval, "certify": _task_certify, "certify_resume": _task_certify_resume,
         "certify_feedforward": _task_certify_feedforward}


# -- fast tests ---------------------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for v in TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_environment_errors_name_the_variable(clean_env):
    assert rd.env_config() is None
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        rd.env_config()
    with pytest.raises(ConfigError, match="MASTER_ADDR"):  # the library's entry points say so too
        rd.context()
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", "http")
    with pytest.raises(ConfigError, match="MASTER_PORT='http' is not an integer"):
        rd.env_config()
    clean_env.setenv("MASTER_PORT", "29500")
    clean_env.setenv("RANK", "2")
    with pytest.raises(ConfigError, match=r"RANK=2 must be in \[0, 2\)"):
        rd.env_config()
    clean_env.delenv("WORLD_SIZE")
    clean_env.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE is not set"):
        rd.env_config()
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    assert rd.env_config() == {"rank": 0, "world_size": 2, "local_rank": 1, "master_addr": "127.0.0.1",
                               "master_port": 29500}


def test_evaluate_and_cli_refuse_an_incomplete_environment(clean_env, capsys):
    from robustdeq.cli import main
    from robustdeq.eval import evaluate
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "1")
    model = _tiny_model().eval()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set.*torchrun"):
        evaluate(model, x, torch.zeros(2, dtype=torch.long), eps=0.1, checks=False)
    assert main(["eval", "no-such.pt", "--eps", "0.1"]) == 2
    assert "MASTER_ADDR is not set" in capsys.readouterr().err
    from robustdeq.certify import certify, smoothing
    from robustdeq.train import Trainer
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        Trainer(model, config={"epochs": 1, "batch_size": 2}).fit(x, y)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        certify(model, x, y)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        smoothing.certify(model, x, y, n0=2, n=4)
    with rd.single_process():  # each process alone: the environment is not read
        assert smoothing.certify(model, x, y, n0=2, n=4).summary["n"] == 2


def test_shard_indices_partition_deterministically():
    for n in (0, 1, 5, 7, 16):
        for w in (1, 2, 3):
            for mode in ("contiguous", "strided"):
                parts = [rd.shard_indices(n, r, w, mode) for r in range(w)]
                assert sorted(i for p in parts for i in p) == list(range(n))
                assert max(map(len, parts)) - min(map(len, parts)) <= 1
                assert parts == [rd.shard_indices(n, r, w, mode) for r in range(w)]
    assert rd.shard_indices(5, 1, 2) == [3, 4] and rd.shard_indices(5, 1, 2, "strided") == [1, 3]
    with pytest.raises(ConfigError, match="rank 2 is not in"):
        rd.shard_indices(4, 2, 2)
    with pytest.raises(ConfigError, match="unknown shard mode"):
        rd.shard_indices(4, 0, 2, "random")
    # without a group the collectives are the identity
    assert rd.context(auto_init=False) is None and rd.world_size() == 1 and rd.is_main()
    assert rd.all_gather_object(3) == [3] and rd.broadcast_object("x") == "x"


def test_two_rank_helpers(two_rank_smoke):  # the default suite's 2-process smoke test
    r0, r1 = ranks.results(two_rank_smoke, "helpers")
    for r in (r0, r1):
        assert torch.equal(r["a"], torch.full((3,), 5 / 3))  # (1*1 + 2*2) / 3
        assert torch.equal(r["b"], torch.full((3,), 1 / 3))  # rank 0's 1*1, rank 1 none
        assert r["c"] is None
        assert float(r["extra"]) == 1.0
        assert r["rows"].flatten().tolist() == [0.0, 10.0, 11.0]
        assert r["stats"] == {"n": 2.0, "m": 1.0}
        assert r["obj"] == 0
    assert r0["shard"] == [0, 1, 2] and r1["shard"] == [3, 4]
    assert r0["main"] and not r1["main"]
    assert sorted(r0["claimed"] + r1["claimed"]) == list(range(7))
    assert r0["merged"] == r1["merged"] and sorted(i for i, _ in r0["merged"]) == list(range(7))
    assert all(i in (r0, r1)[owner]["claimed"] for i, owner in r0["merged"])
    assert r0["failure"] == r1["failure"] == "rank 1 broke"
    assert r0["on_main"] == ("made", [0]) and r1["on_main"] == (None, [])
    assert r0["main_failure"] == r1["main_failure"] == "rank 0 refused"
    for r in (r0, r1):
        assert [t.tolist() for t in r["bcast"]] == [[[1.0, 1.0]] * 3, [1.0, 1.0], [1]]


def test_thread_oversubscription_is_reported(caplog):
    n = torch.get_num_threads()
    with caplog.at_level("WARNING", logger="robustdeq.distributed"):
        assert rd.check_threads({"LOCAL_WORLD_SIZE": "2"}, cores=2 * n)
        assert not caplog.records
        assert not rd.check_threads({"LOCAL_WORLD_SIZE": "3"}, cores=2 * n)
    assert "oversubscribe" in caplog.text and "torch.set_num_threads" in caplog.text


def test_claim_and_gather_without_a_group(clean_env):
    assert list(rd.claim(range(4))) == [0, 1, 2, 3]
    assert rd.gather_sharded([1, 2]) == [1, 2]
    with pytest.raises(ConfigError, match="broke"):
        rd.gather_sharded([1], ConfigError("broke"))


# -- slow: training, evaluation and certification on 2 ranks equal 1 process ------------------------
def _single_train(kind, config=None):
    from robustdeq.train import Trainer
    model = _tiny_model(spectral=kind.endswith("spectral"))
    x, y = _train_data()
    hist = Trainer(model, _objective(kind), config or TRAIN_CONFIG, tensorboard=False).fit(x, y, x[:10], y[:10])
    return model.state_dict(), hist


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ce", "pgd_at", "pgd_at_spectral"])
def test_two_rank_training_equals_one_process(tmp_path, kind):
    ref, ref_hist = _single_train(kind)
    r0, r1 = spawn("train", tmp_path, kind=kind, out_dirs=True)
    for k in ref:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # the ranks stay in sync exactly
        assert torch.allclose(r0["state"][k], ref[k], atol=1e-6, rtol=0), (k, (r0["state"][k] - ref[k]).abs().max())
    init = _tiny_model(spectral=kind.endswith("spectral")).state_dict()
    moved = sum(float((ref[k] - init[k]).abs().max()) for k in ref)
    assert moved > 1e-3  # the steps did change the weights
    if kind.endswith("spectral"):  # the power-iteration buffers moved too, and agree
        assert any(k.endswith("_u") and not torch.equal(ref[k], init[k]) for k in ref)
    for key in ("loss", "val_accuracy", "val_mean_steps"):
        assert r0["history"][0][key] == pytest.approx(ref_hist[0][key], abs=1e-5), key
        assert r0["history"][0][key] == r1["history"][0][key]
    # rank 0 alone wrote the checkpoint, history and TensorBoard
    assert (tmp_path / "run0" / "checkpoint.pt").is_file() and (tmp_path / "run0" / "history.json").is_file()
    assert any((tmp_path / "run0" / "tb").iterdir())
    assert not (tmp_path / "run1").exists()


@pytest.mark.slow
def test_two_rank_training_jacobian_penalty_and_resume(tmp_path):
    r0, r1 = spawn("train", tmp_path / "jac", kind="jac")
    for k in r0["state"]:  # per-rank Hutchinson probes, averaged gradients: the ranks agree
        assert torch.equal(r0["state"][k], r1["state"][k]) and torch.isfinite(r0["state"][k]).all()
    assert r0["history"][0]["jac"] > 0
    r0, r1 = spawn("train_resume", tmp_path / "resume")
    assert r0["start_epoch"] == 1 and r1["start_epoch"] == 1  # rank 1 learnt it from rank 0
    for k in r0["straight"]:
        assert torch.equal(r0["resumed"][k], r1["resumed"][k])
        assert torch.allclose(r0["resumed"][k], r0["straight"][k], atol=1e-6, rtol=0), k
    assert [h["epoch"] for h in r1["history"]] == [0, 1]
    assert not (tmp_path / "resume" / "straight1").exists()


def _spawn_killed(task: str, out: Path) -> None:
    """Run ``task`` with rank 1 killed by SIGKILL; the spawner then ends rank 0 (as torchrun does)."""
    with pytest.raises(Exception, match="signal|SIGKILL|exited"):
        spawn(task, out, kill=True)
    assert not (out / "result0.pt").exists() and not (out / "result1.pt").exists()


@pytest.mark.slow
def test_training_resumes_after_a_killed_rank(tmp_path):
    from robustdeq.defenses.objectives import CrossEntropy
    from robustdeq.train import Trainer
    x, y = _train_data()
    ref = _tiny_model()
    Trainer(ref, CrossEntropy(), KILL_CONFIG, tensorboard=False).fit(x, y)
    _spawn_killed("train_killed", tmp_path)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in saved] == [0]  # epoch 0 was saved, epoch 1 was cut
    r0, r1 = spawn("train_killed", tmp_path)  # the same command again
    assert r0["start_epoch"] == r1["start_epoch"] == 1
    for k, v in ref.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k])
        assert torch.allclose(r0["state"][k], v, atol=1e-6, rtol=0), k
    assert [h["epoch"] for h in r0["history"]] == [0, 1]


def _scrub(d):
    """A report without what legitimately differs between runs (times, resumed flags)."""
    if isinstance(d, dict):
        return {k: _scrub(v) for k, v in d.items()
                if k not in ("seconds", "timings", "resumed", "platform", "created", "timing")}
    if isinstance(d, list):  # (each rank's attack objects warn once about non-convergence)
        return [_scrub(v) for v in d if not (isinstance(v, str) and "non-convergence warnings were raised" in v)]
    return d


def _eval_setup(out: Path):
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1]))  # the spawned ranks import the helpers too
    from helpers.attacks import digits_test
    from helpers.evals import trained_deq
    model = trained_deq()
    x, y = digits_test(20)  # 3 batches of 8, 8, 4: rank 0 attacks two, rank 1 one
    _save_inputs(out, model, x, y)
    return _eval_inputs(out)


def _single_process_report(tmp_path) -> dict:
    """The evaluation of the spawned tests' inputs in this process (the reference)."""
    from robustdeq.eval import evaluate
    model, x, y = _eval_setup(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(model, x, y, **EVAL_OPTIONS).to_dict()


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_process_flag_for_flag(tmp_path):
    ref = _single_process_report(tmp_path)
    flags = [r["robust"] for r in ref["results"]]
    assert any(any(f) for f in flags) and not all(all(f) for f in flags)  # a mixed, telling case
    r0, r1 = spawn("eval", tmp_path, out_dirs=True, interrupt_after=2)
    assert r0["partial_files"] and r1["partial_files"] == []  # rank 0 alone kept the finished units
    for r in (r0, r1):
        assert _scrub(r["report"]) == _scrub(ref)
    assert [a["resumed"] for a in r0["report"]["results"][0]["attacks"]][:2] == [True, True]
    saved = json.loads((tmp_path / "eval0" / "report.json").read_text())
    assert [e["robust"] for e in saved["results"]] == flags
    assert not (tmp_path / "eval1").exists() and not (tmp_path / "eval0" / "partial").exists()


@pytest.mark.slow
def test_evaluation_resumes_after_a_killed_rank(tmp_path):
    ref = _single_process_report(tmp_path)
    _spawn_killed("eval_killed", tmp_path)
    kept = sorted((tmp_path / "killed" / "partial").glob("*.json"))
    assert kept and not (tmp_path / "killed" / "report.json").exists()
    r0, r1 = spawn("eval_killed", tmp_path)  # the same command again
    for r in (r0, r1):
        assert _scrub(r["report"]) == _scrub(ref)
    resumed = [a["resumed"] for a in r0["report"]["results"][0]["attacks"]]
    assert resumed[0] and sum(resumed) >= 1 and not all(resumed)  # units of rank 0 were reused
    assert json.loads((tmp_path / "killed" / "report.json").read_text())["config_hash"] == ref["config_hash"]
    assert not (tmp_path / "killed" / "partial").exists()


@pytest.mark.slow
def test_two_rank_certification_equals_one_process(tmp_path, digits_test, trained_contractive_deq):
    from robustdeq.certify import certify
    model = trained_contractive_deq
    x, y = digits_test(10)
    _save_inputs(tmp_path, model, x, y)
    model, x, y = _eval_inputs(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = certify(model, x, y, eps_l2=(0.05, 0.1), batch_size=4, local_method="power",
                      local_iters=20).to_dict()
    r0, r1 = spawn("certify", tmp_path)
    for r in (r0, r1):
        assert _scrub(r) == _scrub(ref)
    assert [d["details"]["index"] for d in r0["results"]] == list(range(10))
    # certify_checkpoint: rank 0 alone wrote the certificate (rank 1 removed its partial file)
    assert (tmp_path / "cert0" / "certificate.json").is_file()
    assert not (tmp_path / "cert1").exists() or not any((tmp_path / "cert1").iterdir())
    assert len(json.loads((tmp_path / "cert0" / "certificate.json").read_text())["results"]) == 4


def _smoothing_scrub(d):
    """A smoothing report without its times (which differ between runs)."""
    d = {k: v for k, v in d.items() if k != "provenance"}
    d["summary"] = {k: v for k, v in d["summary"].items() if k != "time_per_image_s"}
    d["results"] = [{k: v for k, v in r.items() if k != "seconds"} for r in d["results"]]
    return d


@pytest.mark.slow
def test_two_rank_smoothing_equals_one_process_input_for_input(tmp_path):
    from robustdeq.certify import smoothing as S
    model, x, y = _eval_setup(tmp_path)
    x, y = x[:10], y[:10]
    torch.save((x, y), tmp_path / "data.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = {k: S.certify(model, x, y, **o).to_dict() for k, o in SMOOTHING_OPTIONS.items()}
        ref_pred = S.predict(model, x, sigma=0.25, n=60, batch_size=60, seed=2)
    for ref in refs.values():  # a telling case: some inputs certified, not all with one radius
        radii = [r["radius"] for r in ref["results"]]
        assert any(rad > 0 for rad in radii) and len(set(radii)) > 1
    assert refs["srs"]["results"][0]["srs"]["checked"] == 30
    r0, r1 = spawn("smoothing", tmp_path)
    for r in (r0, r1):
        for k, ref in refs.items():
            assert [e["index"] for e in r["reports"][k]["results"]] == list(range(10))
            assert _smoothing_scrub(r["reports"][k]) == _smoothing_scrub(ref), k
        assert torch.equal(r["predict"], ref_pred)
    # each input certified once, by one rank (one report per option set)
    assert sorted(r0["calls"] + r1["calls"]) == sorted(list(range(10)) * len(SMOOTHING_OPTIONS))
    # rank 0 alone wrote the certificate files
    assert (tmp_path / "smooth0" / "certificate.json").is_file()
    assert (tmp_path / "smooth0" / "certified_accuracy.png").is_file()
    assert not (tmp_path / "smooth1").exists() or not any((tmp_path / "smooth1").iterdir())
    saved = json.loads((tmp_path / "smooth0" / "certificate.json").read_text())
    assert [e["index"] for e in saved["results"]] == [0, 1, 2, 3]


def _torchrun(args, cwd, nproc=2):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={nproc}",
           "--master-addr", "127.0.0.1", "--master-port", str(ranks.free_port()), "--no-python",
           str(Path(sys.executable).parent / "robustdeq"), "--threads", "1"] + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _sharded_and_single(args, report, sharded, single, cwd):
    """Run the command line ``args`` under torchrun (2 processes; rank 0 alone prints "wrote")
    into ``sharded`` and in one process into ``single``; the two ``report`` JSON files."""
    from robustdeq.cli import main
    p = _torchrun(args + ["--out", str(sharded)], cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote ") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--threads", "1"] + args + ["--out", str(single)]) == 0
    return tuple(json.loads((d / report).read_text()) for d in (sharded, single))


@pytest.mark.slow
def test_cli_train_and_eval_under_torchrun(tmp_path):
    run = tmp_path / "run"
    p = _torchrun(["train", "--out", str(run), "--epochs", "1", "--batch-size", "64",
                   "--model-options", '{"hidden": 16}', "--no-progress"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("trained mlp_deq on digits") == 1  # rank 0 prints
    assert (run / "checkpoint.pt").is_file() and json.loads((run / "history.json").read_text())[0]["epoch"] == 0
    args = ["eval", str(run / "checkpoint.pt"), "-n", "12", "--suite", "quick", "--steps", "3",
            "--eps", "0.1,0.2", "--batch-size", "4", "--no-progress"]
    a, b = _sharded_and_single(args, "report.json", tmp_path / "sharded", tmp_path / "single", tmp_path)
    assert [r["robust"] for r in a["results"]] == [r["robust"] for r in b["results"]]
    assert a["config_hash"] == b["config_hash"]
    # randomized smoothing (SRS) from the command line: sharded inputs, rank 0 prints and writes
    # (--noise-n: torchrun's parser would take "--n" for an abbreviation of its own options)
    args = ["certify", str(run / "checkpoint.pt"), "-n", "6", "--smoothing", "0.25", "--noise-n", "60", "--n0", "10",
            "--srs-steps", "2", "--check-samples", "20", "--no-progress"]
    a, b = (r["results"] for r in _sharded_and_single(args, "certificate.json", tmp_path / "smooth2",
                                                        tmp_path / "smooth1", tmp_path))
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


@pytest.mark.slow
def test_two_rank_certification_resumes_after_an_interruption(tmp_path, trained_contractive_deq, monkeypatch):
    """Deterministic and smoothing certify_checkpoint on 2 ranks, stopped on both ranks after one
    unit each: each rank kept its unit in its own file (a killed one-process run's file discarded
    by rank 0); the rerun computes only the other units (a file of another world size discarded)
    and gives the report of an uninterrupted run, on 2 ranks and in one process; the partial files
    are gone."""
    from robustdeq.certify import certify_checkpoint
    from robustdeq.checkpoint import save_checkpoint
    model = trained_contractive_deq
    save_checkpoint(tmp_path / "model.pt", model, model_config=model.robustdeq_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = {m: certify_checkpoint(tmp_path / "model.pt", m, **opts).to_dict()
                for m, (opts, *_) in RESUME_CASES.items()}
    for method, (opts, module, name, _) in RESUME_CASES.items():
        _killed_one_process_run(monkeypatch, tmp_path / "model.pt", tmp_path / method, module, name, method,
                                **opts)
    r0, r1 = spawn("certify_resume", tmp_path)
    for method, (opts, *_) in RESUME_CASES.items():
        a, b = r0[method], r1[method]
        n, unit = opts["n_inputs"], opts["batch_size"] if method == "deterministic" else 1
        stem = "partial_certify" if method == "deterministic" else "partial_smoothing"
        # the interrupted run: one unit on each rank, each in the rank's own file
        assert len(a["runs"]["cut"]) == len(b["runs"]["cut"]) == 1, method
        assert a["left"] == b["left"] == [f"{stem}.rank0-of-2.jsonl", f"{stem}.rank1-of-2.jsonl"], method
        # the rerun: every other unit once, none of those finished
        cut = a["runs"]["cut"] + b["runs"]["cut"]
        rerun = a["runs"]["rerun"] + b["runs"]["rerun"]
        assert sorted(cut + rerun) == list(range(0, n, unit)), method
        if method == "deterministic":  # batch j on rank j % 2, in the interrupted run and the rerun
            assert all((s // unit) % 2 == 0 for s in a["runs"]["cut"] + a["runs"]["rerun"])
            assert all((s // unit) % 2 == 1 for s in b["runs"]["cut"] + b["runs"]["rerun"])
        scrub = _scrub if method == "deterministic" else _smoothing_scrub
        for r in (a, b):
            assert scrub(r["report"]) == scrub(r["uninterrupted"]) == scrub(refs[method]), method
        assert scrub(a["saved"]) == scrub(refs[method]), method
        # the partial files are gone (that of the 3-process run too), the report written
        assert not [f for f in a["after"] if f.startswith("partial")], (method, a["after"])
        assert "certificate.json" in a["after"], method
        # rank 0 discarded the files of the other process layouts, each with a warning
        folder = tmp_path / method
        assert [w.split(" holds partial results of ")[0] for w in a["warnings"]] == \
            [str(folder / f"{stem}.jsonl"), str(folder / f"{stem}.rank2-of-3.jsonl")], a["warnings"]
        assert "a run in one process (this run has 2 processes" in a["warnings"][0]
        assert b["warnings"] == [], method


def _killed_one_process_run(monkeypatch, path: Path, folder: Path, module: str, name: str,
                            method: str = "deterministic", **opts) -> None:
    """certify_checkpoint(path, method, out_dir=folder) in this process, stopped in its second unit
    (the per-unit function ``module.name`` raises): the partial file of a killed one-process run."""
    import importlib
    from robustdeq.certify import certify_checkpoint
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    done = []

    def once(*args):
        if done:
            raise _Stop("one process")
        done.append(True)
        return real(*args)
    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.setattr(mod, name, once)
        with pytest.raises(_Stop):
            certify_checkpoint(path, method, out_dir=folder, **opts)
    stem = "partial_certify" if method == "deterministic" else "partial_smoothing"
    assert [p.name for p in folder.iterdir()] == [f"{stem}.jsonl"]


@pytest.mark.slow
def test_two_rank_feedforward_certification_is_shared_out(tmp_path, monkeypatch, trained_model, digits_test):
    """certify on a feed-forward network under 2 ranks: batch j on rank j % 2 alone, and every
    rank returns the one-process report; certify_checkpoint stopped after one batch on each rank
    (in a folder holding a killed one-process run's file, which rank 0 discards with a warning)
    keeps each rank's batch in its own file, and the rerun computes only the others."""
    from robustdeq.certify import certify, certify_checkpoint
    from robustdeq.checkpoint import load_model, save_checkpoint
    trained = trained_model("ff_mlp", hidden=32)
    save_checkpoint(tmp_path / "ff.pt", trained, model_config=trained.robustdeq_config)
    model, _ = load_model(tmp_path / "ff.pt")
    x, y = digits_test(10)
    torch.save((x, y), tmp_path / "ff_data.pt")
    ref = certify(model.eval(), x, y, batch_size=4, **FF_OPTIONS).to_dict()
    flags = [[r["details"]["linf"][k]["certified"] for k in ("0.001", "0.05")] for r in ref["results"]]
    assert any(any(f) for f in flags) and not all(all(f) for f in flags)  # a mixed, telling case
    saved_ref = certify_checkpoint(tmp_path / "ff.pt", **FF_CHECKPOINT_OPTIONS).to_dict()
    _killed_one_process_run(monkeypatch, tmp_path / "ff.pt", tmp_path / "ffcert", "robustdeq.certify.feedforward",
                            "_feedforward_batch", **FF_CHECKPOINT_OPTIONS)
    r0, r1 = spawn("certify_feedforward", tmp_path)
    assert r0["runs"]["certify"] == [0, 8] and r1["runs"]["certify"] == [4]  # each batch once
    for r in (r0, r1):
        assert _scrub(r["report"]) == _scrub(ref)
        assert [d["details"]["index"] for d in r["report"]["results"]] == list(range(10))
        assert r["report"]["summary"] == ref["summary"]
    # certify_checkpoint: one batch in each rank's own file, then only the other batches
    assert r0["runs"]["cut"] == [0] and r1["runs"]["cut"] == [2]
    assert r0["left"] == r1["left"] == ["partial_certify.rank0-of-2.jsonl", "partial_certify.rank1-of-2.jsonl"]
    assert r0["runs"]["rerun"] == [4] and r1["runs"]["rerun"] == [6]
    for r in (r0, r1):
        assert _scrub(r["resumed"]) == _scrub(saved_ref)
    assert _scrub(json.loads((tmp_path / "ffcert" / "certificate.json").read_text())) == _scrub(saved_ref)
    assert r0["after"] == ["certificate.json", "certificate.md"]
    stale = tmp_path / "ffcert" / "partial_certify.jsonl"
    assert r0["warnings"] == [f"{stale} holds partial results of a run in one process (this run has 2 processes, "
                              "each of which reads its own per-rank file); they are discarded"]
    assert r1["warnings"] == []
    for r in (r0, r1):  # no rank opened its own file before the one-process file was gone
        assert len(r["opened"]) == 2 and not [names for names in r["opened"] if "partial_certify.jsonl" in names]
