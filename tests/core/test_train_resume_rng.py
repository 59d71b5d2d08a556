"""A resumed training run equals an uninterrupted one with every recipe (the random generators of
torch and of the objective are saved with the checkpoint), and a finished run can be extended."""
from __future__ import annotations

import pytest
import torch

from robustdeq.defenses.recipes import recipe
from robustdeq.deq import zoo
from robustdeq.train import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")


def _data(n=48):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _trainer(out, defense, options, epochs, schedule="cosine", cls=Trainer):
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 5})
    obj = recipe(defense, **options).objective
    return cls(model, obj, {"epochs": epochs, "batch_size": 16, "lr": 1e-2, "schedule": schedule},
               out_dir=out, tensorboard=False)


class _Interrupted(Trainer):
    """Ctrl-C at the start of epoch 1 (after epoch 0's checkpoint)."""

    def _epoch(self, epoch, x, y, bar):
        if epoch == 1:
            raise KeyboardInterrupt
        return super()._epoch(epoch, x, y, bar)


def _same(a, b):
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("defense,options", [
    ("pgd-at", {"eps": 0.1, "steps": 2}),                      # random start: torch's global RNG
    ("pgd-at", {"eps": 0.1, "steps": 2, "seed": 5}),           # the objective's own generator
    ("pgd-at-random-state", {"eps": 0.1, "steps": 2}),         # sampled intermediate states
    ("trades", {"eps": 0.1, "steps": 2}),                      # small Gaussian start of the KL attack
    ("jiio-at", {"eps": 0.1, "iters": 3, "random_start": True}),  # joint input-state iteration
])
def test_interrupted_run_resumes_bit_identically(tmp_path, defense, options):
    x, y = _data()
    full = _trainer(tmp_path / "full", defense, options, 2)
    full.fit(x, y)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "cut", defense, options, 2, cls=_Interrupted).fit(x, y)
    resumed = _trainer(tmp_path / "cut", defense, options, 2)
    resumed.fit(x, y)
    assert resumed.start_epoch == 1
    assert _same(resumed.model, full.model)


def test_finished_run_is_extended_to_more_epochs(tmp_path):
    x, y = _data()
    opts = {"eps": 0.1, "steps": 2}
    full = _trainer(tmp_path / "full", "pgd-at", opts, 3, schedule="constant")
    full.fit(x, y)
    _trainer(tmp_path / "ext", "pgd-at", opts, 1, schedule="constant").fit(x, y)
    ext = _trainer(tmp_path / "ext", "pgd-at", opts, 3, schedule="constant")
    hist = ext.fit(x, y)
    assert ext.start_epoch == 1 and [h["epoch"] for h in hist] == [0, 1, 2]
    assert _same(ext.model, full.model)  # a constant schedule: the same as 3 epochs in one go


def test_extended_cosine_run_restarts_its_schedule(tmp_path):
    x, y = _data()
    _trainer(tmp_path / "c", "none", {}, 1).fit(x, y)
    t = _trainer(tmp_path / "c", "none", {}, 3)
    t.fit(x, y)
    steps = 3  # 48 samples, batch 16
    # a fresh cosine over the 2 added epochs: from lr at their start to 0 at their end
    assert t.scheduler.T_max == 2 * steps and t.scheduler.last_epoch == 2 * steps
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_save_outside_fit_writes_a_checkpoint_with_this_process_generator_state(tmp_path):
    from robustdeq.checkpoint import load_checkpoint
    t = _trainer(tmp_path, "none", {}, 1)
    t.save(0)                                   # before any fit(): used to raise AttributeError
    ck = load_checkpoint(t.checkpoint_path)
    assert torch.equal(ck.extra_state["rng_torch"], torch.get_rng_state())


def test_resume_restores_the_generator_of_a_wrapped_objective(tmp_path):
    """lyadeq-at: the recipe's seed seeds the PGD-AT objective inside LyapunovStability; its
    generator is checkpointed and restored too (it was not: the resumed run drew other random
    starts than an uninterrupted one)."""
    x, y = _data(32)

    def make(out, cls=Trainer):
        torch.manual_seed(0)
        model = zoo.build("lyadeq", hidden=8, icnn_hidden=[8], solver={"max_iter": 5})
        obj = recipe("lyadeq-at", eps=0.1, steps=2, seed=5).objective
        return cls(model, obj, {"epochs": 2, "batch_size": 16, "lr": 1e-2}, out_dir=out, tensorboard=False)

    full = make(tmp_path / "full")
    full.fit(x, y)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "cut", _Interrupted).fit(x, y)
    resumed = make(tmp_path / "cut")
    resumed.fit(x, y)
    assert resumed.start_epoch == 1
    assert _same(resumed.model, full.model)
