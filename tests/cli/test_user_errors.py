"""Every user mistake gets a clear error naming the offending option or file, and long runs say
what they are doing. The command line runs in-process (``robustdeq.cli.main``) on tiny settings."""
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from robustdeq import demo, train
from robustdeq.checkpoint import load_checkpoint, save_checkpoint
from robustdeq.cli import main
from robustdeq.cli import demo as demo_command
from robustdeq.cli.attack import torchattack_params
from robustdeq.config import SolverConfig, TrainConfig
from robustdeq.deq import zoo
from robustdeq.errors import CheckpointError, ConfigError, InputError, NonConvergenceWarning


def _tiny(**kw):
    return zoo.build("mlp_deq", hidden=8, **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An (untrained) digits checkpoint: errors and plumbing do not need a trained model."""
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pt"
    torch.manual_seed(0)
    m = _tiny()
    save_checkpoint(path, m, model_config=m.robustdeq_config, metadata={"dataset": "digits"})
    return path


def _one_line_error(capsys, *names):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustdeq: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _argparse_error(capsys, argv, *names):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return _one_line_error(capsys, *names)


# -- torchattacks from the command line ------------------------------------------------------------
@pytest.mark.parametrize("options", [{"attack": "PGD"}, {"attack": "CW", "steps": 2},
                                     {"attack": "APGD", "n_restarts": 1}])
def test_torchattack_runs_with_its_own_parameters(ckpt, tmp_path, capsys, options):
    out = tmp_path / "adv.pt"
    assert main(["attack", str(ckpt), "--attack", "torchattack", "--options", json.dumps(options),
                 "-n", "4", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    d = torch.load(out, weights_only=True)
    assert d["x_adv"].shape == d["x"].shape and d["x_adv"].min() >= 0 and d["x_adv"].max() <= 1
    assert f"torchattacks.{options['attack']}" in capsys.readouterr().out


def test_torchattack_without_options_names_what_is_missing(ckpt, capsys):
    assert main(["attack", str(ckpt), "--attack", "torchattack", "-n", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "--options", '"attack"')


def test_attack_with_several_radii_names_the_one_it_takes(ckpt, capsys):
    assert main(["attack", str(ckpt), "--eps", "0.1,0.2", "-n", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "attack takes one radius", "--eps")


def test_grad_with_an_attack_that_takes_none_is_an_error(ckpt, capsys):
    assert main(["attack", str(ckpt), "--attack", "state", "--grad", "ift", "-n", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "--grad", "'state'")


def test_every_torchattacks_attack_gets_only_parameters_it_accepts():
    import inspect
    import torchattacks
    from robustdeq.attacks import TorchAttack
    model = _tiny().eval()
    base = torchattacks.attack.Attack
    names = [n for n in dir(torchattacks) if inspect.isclass(getattr(torchattacks, n))
             and issubclass(getattr(torchattacks, n), base) and n not in ("Attack", "MultiAttack")]
    assert len(names) > 30
    for name in names:
        params = torchattack_params({"attack": name}, eps=0.1, norm="Linf", steps=3, seed=0)
        if name == "LGV":  # needs a training data loader: said so, not a TypeError
            with pytest.raises(ConfigError, match="trainloader"):
                TorchAttack(model, **params)
            continue
        TorchAttack(model, **params)  # no "unknown parameter(s)" error


# -- raw tracebacks turned into clear errors -------------------------------------------------------
def test_training_into_a_folder_with_another_architecture(tmp_path, capsys):
    other = zoo.build("mlp_deq", hidden=12)
    save_checkpoint(tmp_path / "checkpoint.pt", other, model_config=other.robustdeq_config,
                    metadata={"dataset": "digits"}, extra_state={"epoch": 0})
    rc = main(["train", "--model-options", '{"hidden": 8}', "--epochs", "1", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, "different model", str(tmp_path / "checkpoint.pt"), "--no-resume")


def test_unknown_wrap_options_and_options_without_a_wrapper(ckpt, capsys):
    assert main(["eval", str(ckpt), "-n", "2", "--wrap", "entropy", "--wrap-options",
                 '{"nosuch": 1}', "--no-progress"]) == 2
    _one_line_error(capsys, "--wrap-options", "nosuch", "rounds")
    assert main(["eval", str(ckpt), "-n", "2", "--wrap-options", '{"rounds": 1}', "--no-progress"]) == 2
    _one_line_error(capsys, "--wrap-options", "--wrap none")
    assert main(["eval", str(ckpt), "-n", "2", "--wrap-options", "[1]", "--no-progress"]) == 2
    _one_line_error(capsys, "--wrap-options", "JSON object")


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_non_positive_learning_rate(tmp_path, capsys, value):
    _argparse_error(capsys, ["train", "--lr", value, "--out", str(tmp_path)], "--lr")


def test_negative_learning_rate_in_the_library():
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1)


def test_out_naming_an_existing_file(ckpt, tmp_path, capsys):
    f = tmp_path / "taken.txt"
    f.write_text("x")
    assert main(["train", "--epochs", "1", "--out", str(f), "--no-progress"]) == 2
    _one_line_error(capsys, "--out", str(f))
    assert main(["eval", str(ckpt), "-n", "2", "--out", str(f), "--no-progress"]) == 2
    _one_line_error(capsys, "--out", str(f))
    assert main(["attack", str(ckpt), "-n", "2", "--out", str(tmp_path), "--no-progress"]) == 2
    _one_line_error(capsys, "--out", str(tmp_path))
    from robustdeq.train import Trainer
    with pytest.raises(ConfigError, match="taken.txt"):
        Trainer(_tiny(), out_dir=f).fit(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))


def test_float64_images_are_cast_to_the_model_dtype():
    """What a user expects: the model runs on float64 images (cast to its float32), the gradient
    reaches the float64 input, and attacks return the input's dtype."""
    from robustdeq.attacks import PGD
    m = _tiny().eval()
    x = torch.rand(3, 1, 8, 8)
    x64 = x.double().requires_grad_(True)
    logits = m(x64)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, m(x), atol=1e-5)
    logits.sum().backward()
    assert x64.grad is not None and x64.grad.dtype == torch.float64
    adv = PGD(m, eps=0.1, steps=2)(x.double(), torch.zeros(3, dtype=torch.long))
    assert adv.dtype == torch.float64 and (adv - x.double()).abs().max() <= 0.1 + 1e-9


def test_an_empty_batch_is_an_input_error():
    with pytest.raises(InputError, match="empty batch"):
        _tiny()(torch.rand(0, 1, 8, 8))


@pytest.mark.parametrize("cls", [SolverConfig, TrainConfig])
def test_unknown_config_options_are_config_errors(cls):
    with pytest.raises(ConfigError, match="nosuch") as info:
        cls(nosuch=1)
    assert cls.__name__ in str(info.value)
    with pytest.raises(ConfigError, match="max_iter|epochs"):
        cls(**{"max_iter" if cls is SolverConfig else "epochs": "many"})


# -- values that must not be accepted --------------------------------------------------------------
@pytest.mark.parametrize("n", ["-3", "0"])
def test_sample_count_must_be_positive(ckpt, capsys, n):
    _argparse_error(capsys, ["eval", str(ckpt), "-n", n], "-n", n)
    _argparse_error(capsys, ["certify", str(ckpt), "-n", n], "-n", n)


def test_negative_eps_is_refused(ckpt, capsys):
    assert main(["eval", str(ckpt), "--eps", "0.1,-0.2", "-n", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "--eps")


# -- datasets: the checkpoint's by default, --data-root named ---------------------------------------
@pytest.fixture(scope="module")
def mnist_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mn") / "mnist.pt"
    m = zoo.build("mlp_deq", hidden=8, in_shape=[1, 28, 28])
    save_checkpoint(path, m, model_config=m.robustdeq_config, metadata={"dataset": "mnist"})
    return path


def test_certify_uses_the_checkpoints_dataset(mnist_ckpt, capsys):
    # an MNIST checkpoint is certified on MNIST (not digits): without its folder, --data-root is named
    assert main(["certify", str(mnist_ckpt), "-n", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "'mnist'", "--data-root")


def test_eval_without_a_data_folder_names_the_flag(mnist_ckpt, capsys):
    assert main(["eval", str(mnist_ckpt), "-n", "2", "--no-progress"]) == 2
    line = _one_line_error(capsys, "--data-root")
    assert "root=" not in line


# -- checkpoint files described for what they are ----------------------------------------------------
class _Code:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _files(tmp_path, ckpt):
    raw = ckpt.read_bytes()
    files = {"random": os.urandom(4096), "json": json.dumps({"state_dict": {}}).encode(),
             "truncated": raw[: len(raw) // 2], "empty": b"",
             "code": pickle.dumps({"payload": _Code()}), "plain pickle": pickle.dumps({"a": 1})}
    if files["random"][:1] in (b"\x80", b"{", b"[", b"P"):
        files["random"] = b"\x00" + files["random"]
    out = {}
    for name, data in files.items():
        p = tmp_path / f"{name.replace(' ', '_')}.pt"
        p.write_bytes(data)
        out[name] = p
    torch.save({"payload": _Code()}, tmp_path / "torch_code.pt")
    out["torch code"] = tmp_path / "torch_code.pt"
    return out


@pytest.mark.parametrize("kind,expected", [
    ("random", "not a checkpoint"), ("json", "JSON"), ("truncated", "truncated"), ("empty", "empty"),
    ("code", "code objects"), ("plain pickle", "plain Python pickle"), ("torch code", "code objects")])
def test_checkpoint_messages_say_what_the_file_is(tmp_path, ckpt, kind, expected):
    path = _files(tmp_path, ckpt)[kind]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
    msg = str(info.value)
    assert expected in msg and str(path) in msg
    assert "weights_only=False" not in msg and "file an issue" not in msg.lower()
    assert not [w for w in caught if "file an issue" in str(w.message)]


def test_checkpoint_error_on_the_command_line(tmp_path, ckpt, capsys):
    path = _files(tmp_path, ckpt)["code"]
    assert main(["eval", str(path), "-n", "2", "--no-progress"]) == 2
    _one_line_error(capsys, str(path), "code objects")


# -- warnings point at the user's call ---------------------------------------------------------------
def test_nonconvergence_warning_points_at_the_callers_line():
    m = _tiny(solver={"max_iter": 1, "tol": 1e-12}).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(torch.rand(2, 1, 8, 8))
    hits = [w for w in caught if issubclass(w.category, NonConvergenceWarning)]
    assert hits and hits[0].filename == __file__


def test_adjoint_warning_points_at_the_callers_backward():
    from robustdeq.deq.grad import ImplicitGrad
    m = _tiny(solver={"max_iter": 40, "tol": 1e-6}).eval()
    m.grad = ImplicitGrad(solver={"max_iter": 1, "tol": 1e-12})
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(x).sum().backward()
    hits = [w for w in caught if "adjoint" in str(w.message)]
    assert hits and hits[0].filename == __file__


# -- progress -----------------------------------------------------------------------------------------
def test_autoattack_reports_its_running_sub_attack():
    from robustdeq._support import progress_reporter
    from robustdeq.attacks import AutoAttack
    m = _tiny().eval()
    seen = []
    atk = AutoAttack(m, eps=0.1, version="custom", attacks=["apgd-ce", "apgd-t"],
                     settings={"apgd.n_iter": 2, "apgd_targeted.n_iter": 2, "apgd_targeted.n_target_classes": 1})
    x = torch.rand(3, 1, 8, 8)
    with progress_reporter(seen.append):
        atk(x, m(x).argmax(1))  # correctly classified: the sub-attacks run
    stages = [s["stage"] for s in seen]
    assert "AutoAttack apgd-ce" in stages
    assert {"done", "total"} <= set(seen[-1])


def test_attack_autoattack_shows_progress(ckpt, tmp_path, capsys):
    opts = {"version": "custom", "attacks": ["apgd-ce"], "settings": {"apgd.n_iter": 2}}
    assert main(["attack", str(ckpt), "--attack", "autoattack", "--options", json.dumps(opts), "-n", "2",
                 "--out", str(tmp_path / "a.pt")]) == 0
    err = capsys.readouterr().err
    assert "running AutoAttack" in err and "2 samples" in err


def test_evaluation_bar_names_the_running_unit(monkeypatch):
    from robustdeq.eval import harness
    shown = []

    class Bar:
        def set_postfix_str(self, s, refresh=True):
            shown.append(s)
    show = harness._show_progress(Bar(), "eps 0.1 · autoattack@bpda · 7 samples")
    show({"stage": "AutoAttack apgd-t", "done": 3, "total": 7})
    assert shown == ["eps 0.1 · autoattack@bpda · 7 samples · AutoAttack apgd-t · 3/7 samples done"]


def test_demo_announces_both_trainings(tmp_path, capsys, monkeypatch):
    real_train = train.train_model
    monkeypatch.setattr(train, "train_model", lambda name, opts, train, **kw: real_train(
        name, {**opts, "hidden": 8}, {**train, "epochs": 1}, **kw))
    monkeypatch.setattr(demo, "DEMO_EVAL", {"eps": [0.1], "suite": ["pgd"], "steps": 1, "checks": False})
    assert main(["demo", "--out", str(tmp_path), "--samples", "4", "--defense", "none", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "training the undefended DEQ" in out and "training the hardened model (none" in out
    summary = (tmp_path / "summary.json").read_text()
    assert "00000" not in summary and "99999" not in summary  # no float32 noise


# -- first contact -------------------------------------------------------------------------------------
def test_no_command_runs_the_demo(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(demo_command, "cmd_demo", lambda args: ran.append(args) or 0)
    assert main([]) == 0
    assert ran and ran[0].command == "demo" and ran[0].out == "robustdeq-demo"
    assert "running the demo" in capsys.readouterr().err


def test_version(capsys):
    from robustdeq import __version__
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out


def test_python_m_robustdeq_runs_the_command_line():
    from robustdeq import __version__
    out = subprocess.run([sys.executable, "-m", "robustdeq", "--version"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.stdout.strip() == f"robustdeq {__version__}"
    bad = subprocess.run([sys.executable, "-m", "robustdeq", "eval"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert bad.returncode == 2 and bad.stderr.startswith("robustdeq: error: ")


def test_help_does_not_import_torch():
    code = "import sys, robustdeq.cli as c; c.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_train_defaults_are_the_demos_recipe(monkeypatch, tmp_path, capsys):
    got = {}

    def fake(name, model_options, train_options, **kw):
        got.update(name=name, model=model_options, train=train_options)
        return None, [{"val_accuracy": 0.5}], None
    monkeypatch.setattr(train, "train_model", fake)
    assert main(["train", "--out", str(tmp_path), "--no-progress"]) == 0
    assert got["model"] == demo.DEMO_MODEL["options"]
    assert {k: got["train"][k] for k in demo.DEMO_TRAIN} == demo.DEMO_TRAIN
    main(["train", "--out", str(tmp_path), "--model-options", '{"hidden": 16}', "--dataset", "synthetic"])
    assert got["model"]["hidden"] == 16 and "mean" not in got["model"]


def test_completed_evaluation_removes_partial_and_drops_float32_noise(tmp_path):
    from robustdeq.eval import evaluate
    m = _tiny().eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    rep = evaluate(m, x, y, eps=[0.1], suite=["pgd"], steps=1, checks=False, out_dir=tmp_path)
    assert (tmp_path / "report.json").exists() and not (tmp_path / "partial").exists()
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["clean_accuracy"] == float(f"{rep.clean_accuracy:.6g}")
    assert len(repr(d["results"][0]["robust_accuracy"])) <= 8  # 6 significant digits at most


# -- the error path of the command line ----------------------------------------------------------------
def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main(["certify", str(missing)]) == 2
    _one_line_error(capsys, str(missing))
    with pytest.raises(CheckpointError, match="not found"):
        main(["--debug", "certify", str(missing)])


def test_bad_json_option_is_one_line(ckpt, capsys):
    assert main(["attack", str(ckpt), "--options", "{nope", "-n", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "--options")
