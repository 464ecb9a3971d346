"""Start a controller and node agents against a :class:`SimCluster` (tests only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from warmstart.k8s.controller import Controller
from warmstart.k8s.kube import Kube, api_client, wait_synced
from warmstart.k8s.node import NodeFacts
from warmstart.k8s.nodeagent import NodeAgent
from warmstart.k8s.settings import AgentSettings, ControllerSettings

from .cluster import FakeNodeOps, SimCluster
from .server import FakeApiServer

H100 = NodeFacts(arch="x86_64", gpu_model="NVIDIA H100 80GB HBM3", driver_version="580.65.06",
                 gpu_count=8)
A100 = NodeFacts(arch="x86_64", gpu_model="NVIDIA A100-SXM4-80GB", driver_version="550.54.15",
                 gpu_count=8)


def kube_for(server: FakeApiServer, user_agent: str) -> Kube:
    api = api_client(host=server.url)
    api.user_agent = user_agent
    return Kube(api)


@dataclass
class System:
    server: FakeApiServer
    cluster: SimCluster
    controller: Controller | None = None
    agents: dict[str, NodeAgent] = field(default_factory=dict)
    ops: dict[str, FakeNodeOps] = field(default_factory=dict)

    def add_agent(self, node: str, facts: NodeFacts = H100, *, max_parallel: int = 4,
                  name: str | None = None, **ops_kw: object) -> NodeAgent:
        ops = FakeNodeOps(self.cluster, node, facts, **ops_kw)  # type: ignore[arg-type]
        name = name or node
        agent = NodeAgent(kube_for(self.server, f"warmstart-agent/{name}"), ops,
                          AgentSettings(node_name=node, max_parallel=max_parallel,
                                        metrics_port=0, watch_timeout=3))
        agent.start()
        assert wait_synced([agent.pods, agent.snapshots], agent.stop, timeout=10)
        self.ops[name] = ops
        self.agents[name] = agent
        return agent

    def start_controller(self) -> Controller:
        ctl = Controller(kube_for(self.server, "warmstart-controller"),
                         ControllerSettings(workers=2, metrics_port=0, watch_timeout=3))
        ctl.start()
        assert wait_synced([ctl.pods, ctl.snapshots], ctl.stop, timeout=10)
        self.controller = ctl
        return ctl

    def stop(self) -> None:
        if self.controller:
            self.controller.stop.set()
        for agent in self.agents.values():
            agent.stop.set()


@contextmanager
def running_system() -> Iterator[System]:
    with FakeApiServer() as server:
        system = System(server, SimCluster(server))
        try:
            yield system
        finally:
            system.stop()
