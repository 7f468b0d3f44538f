"""meshnetd's work on one node, as the servers see it: `NodeDaemon` wires the rooms together.

No gRPC or HTTP here: the servers in `api.py` and `peers.py` and the loop in `main.py` call in, and
the peer client is handed in (a fake in unit tests, gRPC in the daemon). docs/internals.md has the
map of the rooms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshnet.cni.protocol import DEFAULT_BIN_DIR
from meshnet.daemon.cni_verbs import CniVerbs
from meshnet.daemon.link_status import LinkStatusWriter
from meshnet.daemon.peer_auth import Caller
from meshnet.daemon.peer_client import PeerClient, PeerLink, PeerNotifier
from meshnet.daemon.peer_service import PeerService
from meshnet.daemon.reconciler import Reconciler
from meshnet.daemon.sandboxes import SandboxRecord
from meshnet.daemon.state import Log, NodeState, PodKey
from meshnet.daemon.vni import VniBlocks
from meshnet.executor import Executor
from meshnet.model import Topology
from meshnet.plan import NodeInfo
from meshnet.store.base import Store


class NodeDaemon:
    def __init__(self, node: NodeInfo, store: Store, executor: Executor, peers: PeerClient, *,
                 grpc_port: int, cni_path: str = DEFAULT_BIN_DIR, log: Log | None = None,
                 sandbox_record: str = "") -> None:
        # sandbox_record: the node-local file of the pods' namespaces ("" = memory only, unit tests)
        self.state = NodeState(node, store, executor, grpc_port=grpc_port, log=log,
                               sandboxes=SandboxRecord(sandbox_record, log))
        self.vni_blocks = VniBlocks(self.state)
        self.peer_client = PeerNotifier(self.state, peers)
        self.link_status = LinkStatusWriter(self.state)
        self.cni = CniVerbs(self.state, self.vni_blocks, self.peer_client, self.link_status, cni_path=cni_path)
        self.peer_service = PeerService(self.state, self.link_status)
        self.reconciler = Reconciler(self.state, self.vni_blocks, self.peer_client, self.link_status)

    # the CNI shim (api.py)
    def handle(self, command: str, env: Mapping[str, str], stdin: str) -> dict[str, Any] | None:
        return self.cni.handle(command, env, stdin)

    @property
    def busy(self) -> bool:
        """A CNI call is being served: the pods it touches are about to settle by themselves."""
        return self.cni.busy

    # peer daemons (peers.py)
    def peer_update(self, reqs: Sequence[PeerLink], caller: Caller) -> list[str]:
        with self.link_status.working():  # the node is busy: news is gathered meanwhile
            return self.peer_service.update(reqs, caller)

    def peer_remove(self, reqs: Sequence[PeerLink], caller: Caller) -> list[str]:
        with self.link_status.working():
            return self.peer_service.remove(reqs, caller)

    # the reconcile loop (main.py)
    def on_store_event(self, event_type: str, topo: Topology, old: Topology | None) -> set[PodKey]:
        return self.reconciler.on_store_event(event_type, topo, old)

    def take_retries(self) -> set[PodKey]:
        return self.reconciler.take_retries()

    def reconcile(self, only: Iterable[PodKey] | None = None) -> int:
        return self.reconciler.reconcile(only)

    def close(self) -> None:
        self.link_status.close()  # news still gathered is written first
        self.peer_client.close()
        self.cni.close()
