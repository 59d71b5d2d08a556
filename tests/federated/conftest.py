import pytest

from helpers.flower import task_identity_set


@pytest.fixture
def task_identity():
    with task_identity_set():
        yield
