"""A Ray-free Flower grid for tests and debugging: :class:`InProcessGrid`.

A ``flwr.serverapp.Grid`` whose ``send_and_receive`` calls the ClientApp in this process, one
``Context`` per node, so the real ServerApp and ClientApp code of :mod:`shn.flower.engine` runs
without Ray or a SuperLink.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity  # internal: flwr is pinned to 1.41.x

__all__ = ["InProcessGrid"]


class InProcessGrid(Grid):
    """A ``flwr.serverapp.Grid`` whose ``send_and_receive`` calls the ClientApp directly.

    Node ids are deliberately unrelated to partition ids (and not in the same order). A client
    that raises becomes an error reply, as on a SuperNode; ``drop`` makes nodes go silent.
    """

    def __init__(self, client_app: Any, num_nodes: int, *, run_config: Mapping[str, Any] | None = None,
                 node_config: Mapping[str, Any] | None = None, run_id: int = 1) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        ids = [(7919 * (i + 3)) % 100_003 + 1 for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid, state=RecordDict(), run_config=dict(run_config or {}),
                         node_config={"partition-id": num_nodes - 1 - i, "num-partitions": num_nodes,
                                      **dict(node_config or {})})
            for i, nid in enumerate(ids)
        }
        self.drop: set[int] = set()  # node ids that never answer
        self.sent: list[Any] = []

    def node_of(self, client: int) -> int:
        return next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == client)

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Any:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        replies = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            if node in self.drop:
                continue
            try:
                replies.append(self.client_app(m, self.contexts[node]))
            except Exception as e:  # noqa: BLE001 - what a SuperNode does with a ClientApp exception
                replies.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m))
        return replies

    def main(self, server_app: Any, run_config: Mapping[str, Any] | None = None) -> None:
        """Run ``server_app``'s main function on this grid."""
        context = Context(run_id=self._run.run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=dict(run_config or {}))
        server_app(self, context)
