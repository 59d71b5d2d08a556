"""SmoothingConfig refuses a field set where the other settings leave it without effect."""
import pytest

from robustdeq.certify.smoothing import make_config
from robustdeq.errors import ConfigError


@pytest.mark.parametrize("options, field, why", [
    ({"check_samples": 50}, "check_samples", "without SRS"),
    ({"srs_start": "clean"}, "srs_start", "without SRS"),
    ({"srs_check": "proof"}, "srs_check", "without SRS"),
    ({"check_alpha_fraction": 0.3}, "check_alpha_fraction", "without SRS"),
    ({"srs_steps": 2, "srs_check": "proof", "check_samples": 50}, "check_samples", "srs_check='proof'"),
    ({"srs_steps": 2, "check_slack": 0.2}, "check_slack", "without check_max"),
    ({"first_batch": 50}, "first_batch", "mode='fixed'"),
    ({"futility_alpha": 0.05}, "futility_alpha", "mode='fixed'"),
    ({"futility": "sequence"}, "futility", "mode='fixed'"),
    ({"tolerance": 0.1}, "tolerance", "mode='fixed'"),
    ({"final_alpha_fraction": 0.0}, "final_alpha_fraction", "mode='fixed'"),
    ({"mode": "sequential", "tolerance": 0.1}, "tolerance", "mode='sequential'"),
])
def test_a_field_without_effect_is_refused(options, field, why):
    with pytest.raises(ConfigError, match=rf"{field}=.* has no effect .*{why}"):
        make_config(options)


@pytest.mark.parametrize("options", [
    {"srs_steps": 2, "check_samples": 50, "srs_start": "clean", "check_alpha_fraction": 0.3},
    {"srs_steps": 2, "check_samples": 50, "check_max": 100, "check_slack": 0.2},
    {"srs_steps": 2, "srs_check": "proof", "srs_start": "clean"},
    {"srs_steps": 2, "srs_check": "auto", "check_samples": 50},
    {"mode": "sequential", "first_batch": 50, "futility_alpha": 0.05, "futility": "sequence",
     "final_alpha_fraction": 0.0},
    {"mode": "radius", "tolerance": 0.1, "first_batch": 50},
    {"check_samples": 400, "first_batch": 100},  # the defaults, given explicitly
])
def test_fields_that_take_effect_are_accepted(options):
    cfg = make_config(options)
    assert all(getattr(cfg, k) == v for k, v in options.items())
