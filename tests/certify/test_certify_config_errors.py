"""CertifyConfig refuses settings that gave a silently wrong or meaningless report (radii given
twice merged into one row of certified accuracy; a negative or NaN fp_tol; a negative seed), and
names its own fields for settings that failed only after the certification solves."""
import pytest

from robustdeq.certify.config import CertifyConfig
from robustdeq.errors import ConfigError


@pytest.mark.parametrize("options,match", [
    ({"eps_l2": [0.1, 0.1]}, r"eps_l2 values must be distinct, got \[0.1, 0.1\]"),
    ({"eps_linf": [0.01, 0.01]}, r"eps_linf values must be distinct"),
    ({"fp_tol": -1.0}, r"fp_tol must be a finite number >= 0, got -1.0"),
    ({"fp_tol": float("nan")}, r"fp_tol must be a finite number >= 0, got nan"),
    ({"seed": -1}, r"seed must be an int >= 0, got -1"),
    ({"lyapunov_steps": 0}, r"lyapunov_steps must be an int >= 1, got 0"),
    ({"local_iters": 0}, r"local_iters must be an int >= 1, got 0"),
    ({"ibp_iters": -5}, r"ibp_iters must be an int >= 1, got -5"),
    ({"local_method": "exact"}, r"unknown local_method 'exact'; expected one of auto, dense, power"),
    ({"spectral": "lanczos"}, r"unknown spectral 'lanczos'; expected one of auto, svd, gram"),
])
def test_bad_settings_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        CertifyConfig(**options)


def test_empty_radii_stay_allowed():
    cfg = CertifyConfig(eps_l2=[], eps_linf=[])  # per-sample radii only
    assert cfg.eps_l2 == () and cfg.eps_linf == ()
