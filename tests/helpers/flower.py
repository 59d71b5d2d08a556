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


class InlineGrid:
    """A Flower ``Grid`` test double that runs the real ``clientapp`` synchronously in this
    process (one virtual SuperNode per client), answering as the simulation engine does: a client
    that raises gives an error reply. ``reason``: node 1000 (partition 0) answers with a
    Flower-level error of that text instead (a crashed worker). ``sent`` counts the messages."""

    def __init__(self, n, reason=None):
        from flwr.app import Context, RecordDict
        self.ctx = {1000 + k: Context(run_id=1, node_id=1000 + k,
                                      node_config={"partition-id": k, "num-partitions": n},
                                      state=RecordDict(), run_config={}) for k in range(n)}
        self.reason = reason
        self.sent = 0

    def get_node_ids(self):
        return list(self.ctx)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message
        from robustdeq.federated.apps import clientapp
        out = []
        for m in messages:
            self.sent += 1
            if self.reason is not None and m.metadata.dst_node_id == 1000:
                out.append(Message(Error(code=0, reason=self.reason), reply_to=m))
                continue
            try:
                out.append(clientapp(m, self.ctx[m.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001 - becomes an error reply, as in Flower
                out.append(Message(Error(code=0, reason=repr(exc)), reply_to=m))
        return out
