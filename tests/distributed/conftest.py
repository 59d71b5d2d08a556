import pytest

from helpers import ranks


@pytest.fixture(scope="session")
def two_rank_smoke(tmp_path_factory):
    """The default suite's fast 2-rank tasks, run by one pair of spawned ranks (each spawned process
    starts Python and imports torch, which costs more than the tasks): ``{name: [rank 0's result,
    rank 1's]}``, read with ``helpers.ranks.results(two_rank_smoke, name)``."""
    return ranks.spawn_tasks({"helpers": "test_distributed:_task_helpers",
                              "agreement": "test_rank_agreement:_task"},
                             tmp_path_factory.mktemp("two_ranks"))
