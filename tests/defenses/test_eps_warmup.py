"""Radius warm-up of the adversarial objectives (``eps_warmup``): the radius of step t is
``eps * min(1, (t + 1) / W)``.

Oracles: the objective at step t produces bit for bit the examples of the same objective built
with that radius and no warm-up; the Trainer's global step drives it (a resumed run continues the
ramp exactly); checkpoints written before the option existed still resume (``describe()`` omits
it at its default).
"""
import pytest
import torch

from robustdeq.config import TrainConfig
from robustdeq.data import synthetic
from robustdeq.defenses.lyapunov import LyapunovStability
from robustdeq.defenses.objectives import JIIOAT, PGDAT, TRADES, make_objective
from robustdeq.deq import zoo
from robustdeq.errors import ConfigError
from robustdeq.train import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")


@pytest.fixture(scope="module")
def data():
    return synthetic(64, seed=0)


def _model(seed=0):
    torch.manual_seed(seed)
    return zoo.build("mlp_deq", hidden=8).eval()


@pytest.mark.parametrize("cls", [PGDAT, TRADES])
def test_step_t_equals_the_objective_at_that_radius(cls, data):
    x, y = data
    x, y = x[:16], y[:16]
    m = _model()
    ramp = cls(eps=0.3, eps_warmup=10, seed=3)
    ramp.set_train_step(4)                     # radius 0.3 * 5 / 10
    assert ramp.current_eps == pytest.approx(0.15)
    got = ramp.generate(m, x, y)
    ref = cls(eps=0.15, seed=3).generate(m, x, y)
    assert torch.equal(got, ref)
    assert float((got - x).abs().max()) <= 0.15 + 1e-6
    ramp.set_train_step(9)
    assert ramp.current_eps == pytest.approx(0.3)
    ramp.set_train_step(1000)                  # stays at eps after the ramp
    assert ramp.current_eps == pytest.approx(0.3)


def test_jiio_at_follows_the_ramp(data):
    x, y = data
    x, y = x[:16], y[:16]
    m = _model()
    ramp = JIIOAT(eps=0.2, eps_warmup=4, iters=3)
    ramp.set_train_step(1)
    got = ramp.generate(m, x, y)
    ref = JIIOAT(eps=0.1, iters=3).generate(m, x, y)
    assert torch.equal(got.x, ref.x)
    assert float((got.x - x).abs().max()) <= 0.1 + 1e-6


def test_calls_count_steps_and_report_the_radius(data):
    x, y = data
    m = zoo.build("mlp_deq", hidden=8)
    obj = PGDAT(eps=0.2, eps_warmup=4, steps=2, seed=0)
    radii = []
    for _ in range(6):
        _, scalars = obj(m, x[:8], y[:8])
        radii.append(scalars["eps"])
    assert radii == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    assert obj.train_step == 6
    _, scalars = PGDAT(eps=0.2, steps=2)(m, x[:8], y[:8])
    assert "eps" not in scalars                # no ramp: scalars as before


class _Stop(Exception):
    pass


class _CrashAtStep6(PGDAT):  # same describe() as PGDAT: the checkpoint resumes with PGDAT
    def __call__(self, model, x, y):
        if self.train_step == 6:
            raise _Stop()
        return super().__call__(model, x, y)


def test_trainer_drives_the_ramp_and_a_resumed_run_continues_it(tmp_path, data):
    x, y = data
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-2, seed=0, schedule="constant")  # 4 steps per epoch
    opts = dict(eps=0.2, steps=2, eps_warmup=6, random_start=False)  # deterministic: weights comparable

    def fit(out_dir, cls):
        torch.manual_seed(0)
        m = zoo.build("mlp_deq", hidden=8)
        obj = cls(**opts)
        return Trainer(m, obj, cfg, out_dir=out_dir, tensorboard=False).fit(x, y), m, obj

    straight, m_ref, obj = fit(tmp_path / "a", PGDAT)
    assert obj.train_step == 8
    # mean radius per epoch: steps 0-3 -> (1+2+3+4)/6 * 0.2 / 4; steps 4-7 -> (5/6 + 1 + 1 + 1) / 4 * 0.2
    assert straight[0]["eps"] == pytest.approx(0.2 * 10 / 24)
    assert straight[1]["eps"] == pytest.approx(0.2 * (5 / 6 + 3) / 4)
    with pytest.raises(_Stop):                 # crash in epoch 1, after epoch 0's checkpoint ...
        fit(tmp_path / "b", _CrashAtStep6)
    resumed, m_res, _ = fit(tmp_path / "b", PGDAT)   # ... and resume with a fresh objective
    assert [h["epoch"] for h in resumed] == [0, 1]
    assert resumed[1]["eps"] == pytest.approx(straight[1]["eps"])
    for k, v in m_ref.state_dict().items():
        assert torch.equal(v, m_res.state_dict()[k]), k


def test_describe_records_the_warmup_and_lyapunov_forwards_the_step():
    for obj in (PGDAT, TRADES, JIIOAT):
        assert obj(eps=0.1).describe()["eps_warmup"] == 0
    assert PGDAT(eps=0.1, eps_warmup=5).describe()["eps_warmup"] == 5
    base = PGDAT(eps=0.3, eps_warmup=3)
    LyapunovStability(base).set_train_step(1)
    assert base.current_eps == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_bad_warmup_is_a_config_error(bad):
    for cls in (PGDAT, TRADES, JIIOAT):
        with pytest.raises(ConfigError, match="eps_warmup"):
            cls(eps=0.1, eps_warmup=bad)


def test_command_line_takes_the_ramp_as_a_defense_option(tmp_path):
    import json
    from robustdeq.cli import main
    out = tmp_path / "run"
    rc = main(["train", "--model", "mlp_deq", "--model-options", '{"hidden": 8}', "--epochs", "2",
               "--batch-size", "512", "--defense", "pgd-at",
               "--defense-options", '{"eps": 0.2, "steps": 1, "eps_warmup": 4}', "--out", str(out),
               "--no-progress"])
    assert rc == 0
    hist = json.loads((out / "history.json").read_text())
    from robustdeq.data import load_digits
    n = load_digits("train")[0].shape[0]    # in batches of 512: 3 steps per epoch
    assert 1024 < n <= 1536
    w = [(k + 1) / 4 * 0.2 for k in range(3)]
    assert hist[0]["eps"] == pytest.approx((512 * w[0] + 512 * w[1] + (n - 1024) * w[2]) / n)
    assert hist[1]["eps"] == pytest.approx(0.2)
    assert main(["train", "--defense", "pgd-at", "--defense-options", '{"eps_warmup": -2}',
                 "--out", str(tmp_path / "bad"), "--epochs", "1"]) == 2
