"""Shared fixtures. The helpers live in the package tests/helpers (importable because pytest puts
this rootdir conftest's folder on sys.path); the trained models and data slices are served here as
session fixtures, so each model is trained once per run."""
import pytest
import torch

from helpers import attacks, evals, torchdeq_models, training


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # tiny models: one thread is much faster than two oversubscribed ones on a 2-core machine
    torch.set_num_threads(1)


# -- training and data ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fit_minibatches():
    """``fit_minibatches(model, x, y, steps, ...)``: the shared short training loop."""
    return training.fit_minibatches


@pytest.fixture(scope="session")
def digits_test():
    """``digits_test(n=64)``: the first ``n`` test digits (x, y)."""
    return attacks.digits_test


@pytest.fixture(scope="session")
def torchdeq_digits():
    """``torchdeq_digits(n=200, offset=0)``: scikit-learn's 8x8 digits for the TorchDEQ models."""
    return torchdeq_models.digits


# -- trained models -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_model():
    """``trained_model(name="mlp_deq", steps=60, seed=0, **options)``: a fresh copy of a zoo model
    trained on digits (each configuration trained once per run)."""
    return attacks.trained


@pytest.fixture(scope="session")
def trained_deq():
    """mlp_deq (hidden 32) trained with the phantom gradient; shared, never modify it."""
    return evals.trained_deq()


@pytest.fixture(scope="session")
def trained_contractive_deq():
    """A spectrally normalised (contractive) mlp_deq, trained; shared, never modify it."""
    return evals.trained_contractive_deq()


@pytest.fixture(scope="session")
def trained_mlp():
    """The feed-forward ff_mlp baseline, trained; shared, never modify it."""
    return evals.trained_mlp()
