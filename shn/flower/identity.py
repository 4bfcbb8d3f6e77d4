"""Which SuperNode is which client, decided on the ServerApp side.

A SuperNode says which client it is (its ``partition-id``, answered to a ``query`` message). What
it says is checked here:

* with a **partition map** (run config ``partition-map``: a TOML file ``"<node id>" = <partition>``,
  node ids as ``flwr supernode ls`` shows them; with SuperNode authentication a node id is bound
  to the node's registered public key), a node may only be the client the map binds it to; nodes
  not in the map are not asked and never used;
* without one, a partition claimed by two or more nodes is **contested**: none of its claimants
  is used (it would be a guess which one is genuine), and the run waits for ``min-nodes``
  uncontested clients as usual.
"""

from __future__ import annotations

import logging
import time
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log as flwr_log

from shn.config import ConfigError

log = logging.getLogger("shn.flower")


def message(content: Any, node_id: int, message_type: str, group: str) -> Any:
    return Message(content=content, dst_node_id=int(node_id), message_type=message_type, group_id=group)


def load_partition_map(path: str | Path, num_clients: int) -> dict[int, int]:
    """``{node id: partition}`` from a TOML file of ``"<node id>" = <partition>`` lines; one
    ConfigError line for anything else (a partition out of range or bound to two nodes)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"run config 'partition-map': {path} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML partition map ({e})") from None
    out: dict[int, int] = {}
    for key, part in data.items():
        if not str(key).isdigit():
            raise ConfigError(f"{path}: key {key!r} is not a node id (expected \"<node id>\" = <partition>)")
        if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < num_clients:
            raise ConfigError(f"{path}: node {key}: partition {part!r} is not a client index 0..{num_clients - 1}")
        out[int(key)] = part
    twice = sorted({p for p in out.values() if list(out.values()).count(p) > 1})
    if twice:
        raise ConfigError(f"{path}: partition(s) {twice} bound to more than one node")
    if not out:
        raise ConfigError(f"{path}: empty partition map")
    return out


def discover_clients(grid: Any, text: str, wanted: Sequence[int], min_nodes: int, timeout: float,
                     poll: float = 0.5, partition_map: Mapping[int, int] | None = None) -> dict[int, int]:
    """Ask the connected nodes for their partition id (a ``query`` message) until ``min_nodes``
    of the ``wanted`` clients are known, each claimed by exactly one node (or bound to it by
    ``partition_map``); ``{client: node id}``."""
    wanted_set = set(int(c) for c in wanted)
    claims: dict[int, set[int]] = {}
    reported: set[int] = set()
    asked: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        new = sorted(set(int(n) for n in grid.get_node_ids()) - asked)
        asked.update(new)
        if partition_map is not None:
            for n in (n for n in new if n not in partition_map):
                log.warning("node %d is not in the partition map; not used", n)
            new = [n for n in new if n in partition_map]
        if new:
            msgs = [message(RecordDict({"config": ConfigRecord({"shn-config": text})}), n, "query", "discover")
                    for n in new]
            for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
                node = int(reply.metadata.src_node_id)
                c = _claimed(reply, node)
                if c is None:
                    continue
                if partition_map is not None and partition_map.get(node) != c:
                    log.warning("node %d claims partition %d but the partition map binds it to %s; not used",
                                node, c, partition_map.get(node))
                elif c not in wanted_set:
                    log.warning("node %d holds partition %d, which is not a training client of this task", node, c)
                else:
                    claims.setdefault(c, set()).add(node)
        clients = {c: next(iter(nodes)) for c, nodes in claims.items() if len(nodes) == 1}
        for c, nodes in sorted(claims.items()):
            if len(nodes) > 1 and c not in reported:
                reported.add(c)
                log.error("partition %d is claimed by nodes %s: none of them is used (bind partitions to node ids "
                          "with the run config partition-map)", c, sorted(nodes))
        if len(clients) >= min_nodes:
            flwr_log(logging.INFO, "shn: %d clients connected: partitions %s", len(clients), sorted(clients))
            return clients
        if time.monotonic() > deadline:
            contested = sorted(c for c, nodes in claims.items() if len(nodes) > 1)
            raise RuntimeError(f"only {len(clients)} of {min_nodes} clients connected within {timeout:.0f} s "
                               f"(partitions {sorted(clients)}" + (f"; contested: {contested}" if contested else "")
                               + "); start more SuperNodes or lower min-nodes")
        time.sleep(poll)


def _claimed(reply: Any, node: int) -> int | None:
    if reply.has_error():
        log.warning("node %d did not say which client it is: %s", node, reply.error.reason)
        return None
    try:
        value = reply.content["metrics"]["partition-id"]
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"partition-id {value!r}")
        return int(value)
    except Exception as e:  # noqa: BLE001 - not our ClientApp
        log.warning("node %d sent an unreadable query reply (%s); ignored", node, e)
        return None
