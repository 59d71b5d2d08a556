"""Two evaluations on one output folder: the second is refused while the first runs (naming it),
and the first's report is intact."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from robustdeq.checkpoint import save_checkpoint
from robustdeq.cli import main
from robustdeq.deq import zoo
from robustdeq.runlock import LOCK_NAME


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 6})
    return str(save_checkpoint(tmp_path / "m.pt", m, model_config=m.robustdeq_config,
                               metadata={"dataset": "digits"}))


EVAL = ["-n", "16", "--suite", "pgd-ift", "--steps", "2", "--eps", "0.1", "--no-progress"]


def test_eval_on_a_folder_owned_by_a_live_run_is_refused(tmp_path, checkpoint, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    fh = open(out / LOCK_NAME, "w")          # a live owner: holds the lock, as another process does
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.write(json.dumps({"pid": 4242, "host": "h", "command": "robustdeq eval m.pt --out ev", "started": 0}))
    fh.flush()
    try:
        assert main(["eval", checkpoint, "--out", str(out), *EVAL]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by another run (pid 4242 on h" in err[0]
        assert not (out / "report.json").exists() and not (out / "partial").exists()
    finally:
        fh.close()


@pytest.mark.slow
def test_two_concurrent_eval_processes_on_one_folder(tmp_path, checkpoint, capsys):
    out = tmp_path / "ev"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "robustdeq", "eval", checkpoint, "--out", str(out),
                              "-n", "32", "--suite", "standard", "--steps", "10", "--eps", "0.1,0.2",
                              "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert main(["eval", checkpoint, "--out", str(out), *EVAL]) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {first.pid}" in err and "robustdeq" in err
        assert first.wait(timeout=600) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    report = json.loads((out / "report.json").read_text())
    assert report["eps"] == [0.1, 0.2] and len(report["results"]) == 2 and not (out / LOCK_NAME).exists()
