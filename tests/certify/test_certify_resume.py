"""certify_checkpoint(..., "deterministic", out_dir=...) keeps each certified batch as it finishes:
a run interrupted part-way resumes (certifying only the batches it lacks) and ends with the
report of an uninterrupted run; a file of other settings or a torn line is never trusted, and the
file is gone once the report is written."""
import json
import math

import pytest
import torch

from robustdeq.certify import api, certify_checkpoint, feedforward
from robustdeq.certify.report import CertResult
from robustdeq.certify.resume import PARTIAL_FILE, BatchResults, certify_partial, discard_other_worlds
from robustdeq.checkpoint import save_checkpoint
from robustdeq.config import SolverConfig
from robustdeq.deq import zoo
from robustdeq.distributed import DistContext

N, BS = 5, 2  # three batches, the last one short
KW = dict(n_inputs=N, batch_size=BS, eps_l2=(0.05, 0.1), eps_linf=(0.01,), local_method="dense",
          methods=("local", "lipschitz", "ibp", "lyapunov"), V="quadratic", perturb=0.1, lyapunov_steps=5)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def ckpt(contractive_checkpoint):
    return contractive_checkpoint[0]


def _counting(monkeypatch, module, name):
    """Batch starts computed so far; ``stop_after[0]`` batches, then Interrupt."""
    calls, stop_after = [], [None]
    real = getattr(module, name)

    def batch(*args):
        if stop_after[0] is not None and len(calls) >= stop_after[0]:
            raise Interrupt
        calls.append(args[-2] if module is feedforward else args[1])
        return real(*args)
    monkeypatch.setattr(module, name, batch)
    return calls, stop_after


@pytest.fixture
def counted(monkeypatch):
    return _counting(monkeypatch, api, "_certify_batch")


def _same(a, b):
    """The report dicts, equal apart from timings and the creation time."""
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("timing")
        d["provenance"].pop("created")
    return da == db


def _cut_and_resume(ckpt, out, calls, stop_after, after, **kw):
    calls.clear()
    stop_after[0] = after
    with pytest.raises(Interrupt):
        certify_checkpoint(ckpt, out_dir=out, **kw)
    assert (out / PARTIAL_FILE).is_file() and not (out / "certificate.json").exists()
    calls.clear()
    stop_after[0] = None


def test_interrupted_certification_resumes_to_the_uninterrupted_report(ckpt, tmp_path, counted):
    calls, stop_after = counted
    full = certify_checkpoint(ckpt, out_dir=tmp_path / "full", **KW)
    assert calls == [0, 2, 4] and not (tmp_path / "full" / PARTIAL_FILE).exists()
    assert all(full.global_certificates.get(k) for k in ("local", "ibp", "lyapunov"))
    assert "lyapunov" in full.results[-1].details  # drawn per batch: seeded by the batch's start
    _cut_and_resume(ckpt, tmp_path / "cut", calls, stop_after, 2, **KW)
    lines = (tmp_path / "cut" / PARTIAL_FILE).read_text().splitlines()
    assert len(lines) == 3 and [json.loads(s)["start"] for s in lines[1:]] == [0, 2]
    resumed = certify_checkpoint(ckpt, out_dir=tmp_path / "cut", **KW)
    assert calls == [4]  # only the batch the interrupted run did not finish
    assert _same(resumed, full)
    assert not (tmp_path / "cut" / PARTIAL_FILE).exists()
    files = [json.loads((tmp_path / d / "certificate.json").read_text()) for d in ("full", "cut")]
    assert files[0]["results"] == files[1]["results"] and files[0]["summary"] == files[1]["summary"]


def test_resumed_with_every_batch_kept_computes_nothing(ckpt, tmp_path, counted, monkeypatch):
    """All batches kept (killed while writing the report): the report is rebuilt from the file."""
    calls, _ = counted
    full = certify_checkpoint(ckpt, **KW)
    real_save = api.CertReport.save

    def fail(self, out_dir):
        raise Interrupt
    monkeypatch.setattr(api.CertReport, "save", fail)
    with pytest.raises(Interrupt):
        certify_checkpoint(ckpt, out_dir=tmp_path, **KW)
    monkeypatch.setattr(api.CertReport, "save", real_save)
    calls.clear()
    assert _same(certify_checkpoint(ckpt, out_dir=tmp_path, **KW), full) and calls == []


def test_other_settings_or_a_torn_line_are_not_reused(ckpt, tmp_path, counted, caplog):
    calls, stop_after = counted
    full = certify_checkpoint(ckpt, **KW)
    _cut_and_resume(ckpt, tmp_path, calls, stop_after, 2, **KW)
    part = tmp_path / PARTIAL_FILE
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-line
    rep = certify_checkpoint(ckpt, out_dir=tmp_path, **KW)
    assert calls == [2, 4] and "unreadable" in caplog.text
    assert _same(rep, full)
    # other settings: the kept results are not reused
    caplog.clear()
    _cut_and_resume(ckpt, tmp_path / "eps", calls, stop_after, 2, **KW)
    other = certify_checkpoint(ckpt, out_dir=tmp_path / "eps", **{**KW, "eps_l2": (0.2,)})
    assert calls == [0, 2, 4] and "another configuration" in caplog.text
    assert other.settings["eps_l2"] == [0.2] and list(other.results[0].details["l2_certified"]) == ["0.2"]
    assert json.loads((tmp_path / "eps" / "certificate.json").read_text())["settings"]["eps_l2"] == [0.2]
    # another batch size: a kept batch would cover other inputs
    caplog.clear()
    _cut_and_resume(ckpt, tmp_path / "bs", calls, stop_after, 1, **KW)
    certify_checkpoint(ckpt, out_dir=tmp_path / "bs", **{**KW, "batch_size": 3})
    assert calls == [0, 3] and "another configuration" in caplog.text


def test_progress_is_not_a_setting_but_the_data_is(ckpt, tmp_path, counted):
    calls, stop_after = counted
    _cut_and_resume(ckpt, tmp_path / "a", calls, stop_after, 1, **KW)
    certify_checkpoint(ckpt, out_dir=tmp_path / "a", progress=True, **KW)
    assert calls == [2, 4]
    _cut_and_resume(ckpt, tmp_path / "b", calls, stop_after, 1, **KW)
    certify_checkpoint(ckpt, out_dir=tmp_path / "b", **{**KW, "n_inputs": N - 1})  # other data
    assert calls == [0, 2]


def test_settings_holding_code_keep_no_file(ckpt, tmp_path, counted):
    calls, stop_after = counted
    stop_after[0] = 1

    def V(z, z_ref):
        return (z - z_ref).flatten(1).norm(dim=1)
    with pytest.raises(Interrupt):
        certify_checkpoint(ckpt, out_dir=tmp_path, **{**KW, "methods": ("lyapunov",), "V": V})
    assert not (tmp_path / PARTIAL_FILE).exists()


def test_feedforward_certification_resumes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = zoo.build("ff_mlp", hidden=8)
    path = tmp_path / "ff.pt"
    save_checkpoint(path, model, model_config=model.robustdeq_config)
    calls, stop_after = _counting(monkeypatch, feedforward, "_feedforward_batch")
    kw = dict(n_inputs=N, batch_size=BS, eps_linf=(0.01,), eps_l2=())
    full = certify_checkpoint(path, **kw)
    _cut_and_resume(path, tmp_path / "cut", calls, stop_after, 2, **kw)
    assert _same(certify_checkpoint(path, out_dir=tmp_path / "cut", **kw), full) and calls == [4]
    assert not (tmp_path / "cut" / PARTIAL_FILE).exists()


def test_a_one_process_run_discards_the_files_of_a_process_group(ckpt, tmp_path, counted, caplog):
    """Per-rank files of a killed torchrun run in the folder: a one-process run never reads them;
    it removes them, with a warning naming each, and certifies every batch itself."""
    calls, stop_after = counted
    full = certify_checkpoint(ckpt, **KW)
    _cut_and_resume(ckpt, tmp_path, calls, stop_after, 2, **KW)
    kept = (tmp_path / PARTIAL_FILE).read_text()
    (tmp_path / PARTIAL_FILE).unlink()
    stale = ["partial_certify.rank0-of-2.jsonl", "partial_certify.rank1-of-2.jsonl.tmp"]
    for name in stale:
        (tmp_path / name).write_text(kept)
    (tmp_path / "partial_smoothing.rank0-of-2.jsonl").write_text("{}\n")  # smoothing's: not this run's
    with caplog.at_level("WARNING", logger="robustdeq.certify.resume"):
        rep = certify_checkpoint(ckpt, out_dir=tmp_path, **KW)
    assert calls == [0, 2, 4] and _same(rep, full)
    for name in stale:
        assert f"{tmp_path / name} holds partial results of rank" in caplog.text
    assert "this run is one process" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certificate.json", "certificate.md",
                                                          "partial_smoothing.rank0-of-2.jsonl"]


def test_rank_0_discards_the_files_no_rank_of_its_group_reads(tmp_path, caplog):
    """In a group of 2 (rank 0's part, without the collective): the one-process file and the
    files of 3 processes go, with a warning naming each; the group's own files stay."""
    names = ["partial_certify.jsonl", "partial_certify.jsonl.tmp", "partial_certify.rank0-of-2.jsonl",
             "partial_certify.rank1-of-2.jsonl", "partial_certify.rank2-of-3.jsonl", "partial_smoothing.jsonl",
             "certificate.json"]
    for name in names:
        (tmp_path / name).write_text('{"config_hash": "x"}\n')
    with caplog.at_level("WARNING", logger="robustdeq.certify.resume"):
        discard_other_worlds(tmp_path, PARTIAL_FILE, DistContext(rank=1, world_size=2, local_rank=1, backend="gloo"))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # rank 1 leaves it to rank 0
        discard_other_worlds(tmp_path, PARTIAL_FILE, DistContext(rank=0, world_size=2, local_rank=0, backend="gloo"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "certificate.json", "partial_certify.rank0-of-2.jsonl", "partial_certify.rank1-of-2.jsonl",
        "partial_smoothing.jsonl"]
    for name in ("partial_certify.jsonl", "partial_certify.jsonl.tmp"):
        assert f"{tmp_path / name} holds partial results of a run in one process (this run has 2" in caplog.text
    assert f"{tmp_path / 'partial_certify.rank2-of-3.jsonl'} holds partial results of a run on 3" in caplog.text


def test_a_batch_round_trips_exactly_through_the_file(tmp_path):
    """Floats bit for bit (-0.0, 1/3, tiny), infinities, NaN, None and nested details."""
    odd = [1 / 3, -0.0, 5e-324, float("inf"), float("-inf"), float("nan"), None, 1e308]
    results = [CertResult(stable=i % 2 == 0, bound=None if i else float("inf"), radius=odd[i] if i < 2 else 0.25,
                          method="m | x", details={"index": 4 + i, "label": None, "residual": odd[i + 2],
                                                   "deployed": {"gap": odd[i + 4], "steps": 3},
                                                   "linf": {"0.01": {"certified": False, "lower_margin": odd[i + 5]}},
                                                   "local": {"rho": odd[i + 3], "exact": True}})
               for i in range(2)]
    batch = BatchResults(4, results, unconverged=1, refused=2, ibp_reason=None,
                         local={"method": "dense", "exact": True, "note": "n", "fp_tol": 1e-6})
    model = zoo.build("mlp_deq", hidden=8)
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    cfg = api.make_certify_config(None, batch_size=4, solver=SolverConfig(max_iter=7))
    part = certify_partial(tmp_path, cfg, model, x, y)
    part.add(batch)
    part.close()
    back = certify_partial(tmp_path, cfg, model, x, y).done[4]
    assert json.dumps(back.to_dict()) == json.dumps(batch.to_dict())
    assert (back.unconverged, back.refused, back.ibp_reason, back.local) == (1, 2, None, batch.local)
    for a, b in zip(back.results, results):
        assert (a.stable, a.bound, a.method) == (b.stable, b.bound, b.method)
        assert math.copysign(1, a.radius) == math.copysign(1, b.radius) and a.radius == b.radius
        for key in ("residual",):
            va, vb = a.details[key], b.details[key]
            assert (va is None and vb is None) or (math.isnan(va) and math.isnan(vb)) or \
                (va == vb and math.copysign(1, va) == math.copysign(1, vb))
    # a batch that does not cover its inputs (another batch size, a damaged line) is not taken
    assert BatchResults.from_dict(batch.to_dict(), 6, 2) is not None
    assert BatchResults.from_dict({**batch.to_dict(), "start": 2}, 6, 2) is None
    assert BatchResults.from_dict(batch.to_dict(), 6, 3) is None
