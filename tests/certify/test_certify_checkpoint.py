"""certify_checkpoint(path, method=...): one entry point for a checkpoint's certificates; each method
gives the report its direct call gives on the same samples."""
import pytest

from robustdeq.certify import CertReport, certify, certify_checkpoint, smoothing
from robustdeq.data import load_digits
from robustdeq.errors import ConfigError


@pytest.fixture(scope="module")
def ckpt(contractive_checkpoint):
    return contractive_checkpoint


def test_smoothing_method_equals_the_direct_call(ckpt, tmp_path):
    path, model = ckpt
    opts = dict(sigma=0.25, n0=10, n=60, batch_size=30, seed=3)
    rep = certify_checkpoint(path, "smoothing", n_inputs=3, out_dir=tmp_path, **opts)
    x, y = load_digits("test")
    direct = smoothing.certify(model, x[:3], y[:3], **opts)
    assert isinstance(rep, smoothing.SmoothingReport)
    assert [(r.prediction, r.radius) for r in rep.results] == [(r.prediction, r.radius) for r in direct.results]
    assert rep.provenance["checkpoint"].endswith("m.pt") and (tmp_path / "certificate.json").is_file()


def test_deterministic_is_the_default_and_options_are_checked_per_method(ckpt):
    path, model = ckpt
    rep = certify_checkpoint(path, n_inputs=2, eps_l2=(0.1,))
    x, y = load_digits("test")
    assert isinstance(rep, CertReport)
    assert [r.radius for r in rep.results] == pytest.approx([r.radius for r in certify(model, x[:2], y[:2], eps_l2=(0.1,)).results])
    with pytest.raises(ConfigError, match="unknown option"):
        certify_checkpoint(path, "smoothing", sigma=0.25, eps_l2=(0.1,))  # a deterministic option
    with pytest.raises(ConfigError, match="unknown option"):
        certify_checkpoint(path, "deterministic", sigma=0.25)
