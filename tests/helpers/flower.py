"""Flower test support."""
import contextlib


@contextlib.contextmanager
def task_identity_set():
    """Flower messages need a task identity (set by the runtimes; set here for direct tests)."""
    from flwr.supercore.task_identity import TaskIdentity
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
