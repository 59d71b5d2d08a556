"""Trainer: learning, checkpoints every epoch, resume, TensorBoard, config errors."""
import json

import pytest
import torch

from robustdeq.checkpoint import load_checkpoint, load_model
from robustdeq.config import TrainConfig
from robustdeq.data import synthetic
from robustdeq.deq import zoo
from robustdeq.errors import CheckpointError, ConfigError, InputError
from robustdeq.defenses.objectives import CrossEntropy
from robustdeq.train import Trainer, evaluate_clean


@pytest.fixture(scope="module")
def data():
    x, y = synthetic(256, seed=0)
    xt, yt = synthetic(128, seed=0, sample_seed=7)
    return x, y, xt, yt


def test_training_learns_and_writes_checkpoint_and_logs(tmp_path, data):
    x, y, xt, yt = data
    model = zoo.build("mlp_deq", hidden=16)
    before = evaluate_clean(model, xt, yt)["accuracy"]
    hist = Trainer(model, config={"epochs": 3, "batch_size": 32, "lr": 1e-2}, out_dir=tmp_path).fit(x, y, xt, yt)
    assert len(hist) == 3 and hist[-1]["val_accuracy"] > max(0.8, before)
    assert {"val_mean_steps", "val_converged_fraction", "val_mean_residual", "epoch_time_s"} <= set(hist[-1])
    assert (tmp_path / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "history.json").read_text()) == hist
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    loaded, ck = load_model(tmp_path / "checkpoint.pt")
    assert ck.model_config["name"] == "mlp_deq"
    assert evaluate_clean(loaded, xt, yt)["accuracy"] == pytest.approx(hist[-1]["val_accuracy"])


def test_resume_refuses_a_different_config(tmp_path, data):
    x, y, _, _ = data
    cfg = {"epochs": 2, "batch_size": 64, "lr": 1e-2, "seed": 1}
    Trainer(zoo.build("mlp_deq", hidden=16), config=cfg, out_dir=tmp_path).fit(x, y)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck.extra_state["epoch"] == 1
    # a different config must not silently resume
    with pytest.raises(CheckpointError, match="different training config"):
        Trainer(zoo.build("mlp_deq", hidden=16), config={**cfg, "lr": 0.5}, out_dir=tmp_path).fit(x, y)
    # nor return a model trained for more epochs than asked (it returned the 2-epoch run)
    with pytest.raises(CheckpointError, match="holds a run of 2 epochs, more than the 1 asked for"):
        Trainer(zoo.build("mlp_deq", hidden=16), config={**cfg, "epochs": 1}, out_dir=tmp_path).fit(x, y)


def test_resume_after_interrupt_equals_straight_run(tmp_path, data):
    x, y, _, _ = data
    cfg = {"epochs": 3, "batch_size": 64, "lr": 1e-2, "seed": 1, "schedule": "constant"}
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in zoo.build("mlp_deq", hidden=16).state_dict().items()}
    ref = zoo.build("mlp_deq", hidden=16); ref.load_state_dict(init)
    Trainer(ref, config=cfg).fit(x, y)

    class Stop(Exception):
        pass

    calls = {"n": 0}
    base = CrossEntropy()

    def flaky(model, xb, yb):  # crash in the middle of epoch 2 (after epoch 0 and 1 checkpoints)
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 2:
            raise Stop()
        return base(model, xb, yb)
    flaky.describe = base.describe
    m = zoo.build("mlp_deq", hidden=16); m.load_state_dict(init)
    with pytest.raises(Stop):
        Trainer(m, flaky, config=cfg, out_dir=tmp_path).fit(x, y)
    m2 = zoo.build("mlp_deq", hidden=16)  # fresh weights: must be replaced by the checkpoint
    hist = Trainer(m2, base, config=cfg, out_dir=tmp_path).fit(x, y)
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    # TensorBoard shows every step once: the killed epoch's steps logged before the crash are purged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [0, 4, 8], steps            # one point per epoch (log_every), none twice
    assert [e.step for e in acc.Scalars("epoch/loss")] == [0, 1, 2]


def test_trainer_errors(data):
    x, y, _, _ = data
    with pytest.raises(ConfigError, match="unknown option"):
        Trainer(zoo.build("mlp_deq", hidden=8), config={"epoch": 1})
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="epochs must be >= 1, got 0"):  # it trained nothing, returning []
        Trainer(zoo.build("mlp_deq", hidden=8), config={"epochs": 0})
    with pytest.raises(InputError):
        Trainer(zoo.build("mlp_deq", hidden=8), config={"epochs": 1}).fit(x * 3, y)
    with pytest.raises(InputError, match="y_train"):
        Trainer(zoo.build("mlp_deq", hidden=8), config={"epochs": 1}).fit(x, y.float())
