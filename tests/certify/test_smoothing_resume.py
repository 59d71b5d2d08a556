"""certify_checkpoint(..., "smoothing", out_dir=...) keeps each certified input as it finishes: a
run interrupted part-way resumes (certifying only the inputs it lacks) and ends with the
certificate of an uninterrupted run; a file of other settings or a torn line is never trusted."""
import json

import pytest

from robustdeq.certify import certify_checkpoint
from robustdeq.certify.smoothing import engine
from robustdeq.certify.smoothing.resume import PARTIAL_FILE

N = 4


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def ckpt(contractive_checkpoint):
    return contractive_checkpoint[0]


@pytest.fixture
def counted(monkeypatch):
    """Inputs certified so far (their indices); ``stop_after[0]`` inputs, then Interrupt."""
    calls, stop_after = [], [None]
    real = engine._certify_one

    def one(base, x1, index, cfg):
        if stop_after[0] is not None and len(calls) >= stop_after[0]:
            raise Interrupt
        calls.append(index)
        return real(base, x1, index, cfg)
    monkeypatch.setattr(engine, "_certify_one", one)
    return calls, stop_after


def _rows(rep):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rep.to_dict()["results"]]


@pytest.mark.parametrize("opts", [dict(), dict(mode="sequential", radii=(0.1, 0.2), first_batch=20),
                                  dict(mode="radius", first_batch=20),
                                  dict(srs_steps=2, check_samples=10, check_max=30),
                                  dict(mode="radius", first_batch=20, srs_steps=2, srs_check="proof")],
                         ids=["fixed", "sequential", "radius", "srs", "srs-radius-proof"])
def test_interrupted_smoothing_resumes_to_the_uninterrupted_certificate(ckpt, tmp_path, counted, opts):
    calls, stop_after = counted
    kw = dict(sigma=0.25, n0=10, n=60, batch_size=30, seed=3, n_inputs=N, **opts)
    full = certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path / "full", **kw)
    assert not (tmp_path / "full" / PARTIAL_FILE).exists()
    calls.clear()
    stop_after[0] = 2
    with pytest.raises(Interrupt):
        certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path / "cut", **kw)
    assert (tmp_path / "cut" / PARTIAL_FILE).is_file() and not (tmp_path / "cut" / "certificate.json").exists()
    calls.clear()
    stop_after[0] = None
    resumed = certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path / "cut", **kw)
    assert calls == [2, 3]  # only the inputs the interrupted run did not finish
    assert _rows(resumed) == _rows(full)
    drop = lambda s: {k: v for k, v in s.items() if "time" not in k}  # noqa: E731
    assert drop(resumed.summary) == drop(full.summary)
    assert not (tmp_path / "cut" / PARTIAL_FILE).exists()


def test_other_settings_or_a_torn_line_are_not_reused(ckpt, tmp_path, counted, caplog):
    calls, stop_after = counted
    kw = dict(sigma=0.25, n0=10, n=60, batch_size=30, seed=3, n_inputs=N)
    stop_after[0] = 3
    with pytest.raises(Interrupt):
        certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path, **kw)
    part = tmp_path / PARTIAL_FILE
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-line
    calls.clear()
    stop_after[0] = None
    rep = certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path, **kw)
    assert calls == [2, 3] and "unreadable" in caplog.text
    # another seed: the kept results are of other settings, none is reused
    stop_after[0] = 1
    with pytest.raises(Interrupt):
        certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path, **kw)
    calls.clear()
    stop_after[0] = None
    other = certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path, **{**kw, "seed": 4})
    assert calls == list(range(N)) and "another configuration" in caplog.text
    assert json.loads((tmp_path / "certificate.json").read_text())["config"]["seed"] == 4
    assert other.config["seed"] == 4 and len(rep.results) == N


def test_a_one_process_run_discards_the_files_of_a_process_group(ckpt, tmp_path, counted, caplog):
    """Per-rank files of a killed torchrun run: removed with a warning, every input certified."""
    calls, stop_after = counted
    kw = dict(sigma=0.25, n0=10, n=60, batch_size=30, seed=3, n_inputs=N)
    full = certify_checkpoint(ckpt, "smoothing", **kw)
    stop_after[0] = 2
    with pytest.raises(Interrupt):
        certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path, **kw)
    stale = tmp_path / "partial_smoothing.rank1-of-2.jsonl"
    (tmp_path / PARTIAL_FILE).rename(stale)
    calls.clear()
    stop_after[0] = None
    with caplog.at_level("WARNING", logger="robustdeq.certify.resume"):
        rep = certify_checkpoint(ckpt, "smoothing", out_dir=tmp_path, **kw)
    assert calls == list(range(N)) and _rows(rep) == _rows(full)
    assert f"{stale} holds partial results of rank 1 of a run on 2 processes" in caplog.text
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("partial")]
