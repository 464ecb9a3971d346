"""Prometheus metrics of the agent (its own registry, served on a TCP port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.operations = Counter("warmstart_agent_operations", "Finished operations",
                                  ["type", "result"], registry=r)
        self.in_progress = Gauge("warmstart_agent_operations_in_progress",
                                 "Operations pending or running", ["type"], registry=r)
        self.duration = Histogram(
            "warmstart_agent_operation_seconds", "Duration of finished operations", ["type"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800), registry=r)
        self.bytes = Counter("warmstart_agent_snapshot_bytes",
                             "Snapshot bytes written (checkpoint) or read (restore)", ["type"],
                             registry=r)
        self.failures = Counter("warmstart_agent_failures", "Failed operations by error class",
                                ["type", "error"], registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on ``addr:port`` in a thread; returns the bound port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)
