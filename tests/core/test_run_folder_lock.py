"""One run per output folder (robustdeq.runlock): a live owner refuses a second run, naming it;
the lock of a dead run is taken over with a warning and the run resumes; release on exceptions."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from robustdeq import runlock
from robustdeq.deq import zoo
from robustdeq.runlock import LOCK_NAME, FolderLockedError
from robustdeq.train import Trainer

# the tiny models here stop after 4 solver iterations on purpose: their non-convergence is not the subject
pytestmark = pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _trainer(out, epochs=1):
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 4})
    return Trainer(model, None, {"epochs": epochs, "batch_size": 16}, out_dir=out, tensorboard=False)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_live_owner_refuses_a_second_run_and_names_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # another run holding the lock (an open file description of its own, as another process has)
    fh = open(out / LOCK_NAME, "w")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.write(json.dumps({"pid": 4242, "host": "somehost", "command": "robustdeq eval --out run",
                         "started": 0}))
    fh.flush()
    try:
        x, y = _data()
        with pytest.raises(FolderLockedError, match=r"in use by another run \(pid 4242 on somehost.*robustdeq eval"):
            _trainer(out).fit(x, y)
        assert not (out / "checkpoint.pt").exists()
    finally:
        fh.close()
    # once the owner is gone the folder is free again
    _trainer(out).fit(*_data())
    assert (out / "checkpoint.pt").exists() and not (out / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_run_is_taken_over_and_the_run_resumes(tmp_path, caplog):
    out = tmp_path / "run"
    x, y = _data()
    _trainer(out, epochs=1).fit(x, y)
    pid = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": os.uname().nodename,
                                             "command": "robustdeq train --out run", "started": 0}))
    with caplog.at_level(logging.WARNING, logger="robustdeq.runlock"):
        t = _trainer(out, epochs=2)
        hist = t.fit(x, y)
    assert t.start_epoch == 1 and len(hist) == 2            # resumed, not restarted
    assert f"no longer running (pid {pid}" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_lock_is_released_on_an_exception_and_nested_holds_are_one(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with runlock.hold(out, "first"):
            with runlock.hold(out):                          # the same process: nested
                assert runlock.owner(out)["command"] == "first"
            assert (out / LOCK_NAME).exists()                # still held by the outer block
            raise RuntimeError("boom")
    assert not (out / LOCK_NAME).exists()
    with runlock.hold(out):
        assert runlock.owner(out)["pid"] == os.getpid()
