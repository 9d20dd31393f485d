"""Every running sandbox's metrics in one Prometheus exposition, and an HTTP server for it.

Each sandbox's agent renders its own exposition (``AgentClient.metrics``). Pasting them
together would repeat every ``# HELP``/``# TYPE`` line, which Prometheus rejects, so
:class:`SandboxesCollector` parses them (``prometheus_client.parser``), forces each series'
``sandbox`` label to the sandbox's name and merges the families by name. It adds
``bulkhead_sandbox_up`` (1 when the scrape of that sandbox worked) and
``bulkhead_sandbox_scrape_duration_seconds``. Sandboxes are scraped in parallel, each with
a deadline, on every request to ``/metrics``: nothing is cached between scrapes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import AgentClient
from .errors import BulkheadError
from .state import SandboxInfo, SandboxPaths

if TYPE_CHECKING:  # prometheus_client is imported when used: the CLI loads this module always
    from prometheus_client.core import Metric

DEFAULT_LISTEN = "127.0.0.1:9464"
SCRAPE_TIMEOUT = 10.0
WORKERS = 8


def labelled(text: str, sandbox: str) -> list[Metric]:
    """The families of an exposition with every sample's ``sandbox`` label set to ``sandbox``."""
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(text))
    for family in families:
        family.samples = [
            s._replace(labels={**s.labels, "sandbox": sandbox}) for s in family.samples
        ]
    return families


def merge(per_sandbox: Iterable[list[Metric]]) -> list[Metric]:
    """One family per name, with the samples of every sandbox (a family whose type differs
    from the first one seen, as from an agent of another version, is left out)."""
    from prometheus_client.core import Metric

    merged: dict[str, Metric] = {}
    for families in per_sandbox:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            elif into.type != family.type:
                continue
            into.samples.extend(family.samples)
    return list(merged.values())


class SandboxesCollector:
    """A prometheus_client collector over every running sandbox of a state directory."""

    def __init__(
        self, state_dir: Path | None, *, timeout: float = SCRAPE_TIMEOUT, workers: int = WORKERS
    ) -> None:
        self.state_dir = state_dir  # None: the default (see bulkhead.state)
        self.timeout = timeout
        self.workers = workers
        self._clients: dict[str, tuple[float, AgentClient]] = {}
        self._lock = threading.Lock()

    def _running(self) -> list[SandboxInfo]:
        from .sandbox import Sandbox

        return [i for i in Sandbox.list(self.state_dir) if i.status == "running"]

    def _client(self, info: SandboxInfo) -> AgentClient:
        # One channel per sandbox, kept while it lives: dialling per scrape costs more.
        with self._lock:
            known = self._clients.get(info.name)
            if known is not None and known[0] == info.created:
                return known[1]
            if known is not None:
                known[1].close()
            client = AgentClient(SandboxPaths(info.dir).agent_sock, timeout=self.timeout)
            self._clients[info.name] = (info.created, client)
            return client

    def _forget_others(self, names: set[str]) -> None:
        with self._lock:
            for name in list(self._clients):
                if name not in names:
                    self._clients.pop(name)[1].close()

    def _scrape(self, info: SandboxInfo) -> tuple[str, float, list[Metric] | None]:
        started = time.monotonic()
        try:
            text = self._client(info).metrics(info.name, timeout=self.timeout)
            families = labelled(text, info.name)
        except (BulkheadError, ValueError):
            families = None  # down, slow or garbled: bulkhead_sandbox_up says so
        return info.name, time.monotonic() - started, families

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        infos = self._running()
        self._forget_others({i.name for i in infos})
        results: list[tuple[str, float, list[Metric] | None]] = []
        if infos:
            with ThreadPoolExecutor(min(self.workers, len(infos))) as pool:
                results = list(pool.map(self._scrape, infos))
        yield from merge(families for _, _, families in results if families is not None)
        up = GaugeMetricFamily(
            "bulkhead_sandbox_up", "Whether the sandbox's agent answered", labels=["sandbox"]
        )
        took = GaugeMetricFamily(
            "bulkhead_sandbox_scrape_duration_seconds",
            "Time the sandbox's GetMetrics took",
            labels=["sandbox"],
        )
        for name, seconds, families in results:
            up.add_metric([name], 1 if families is not None else 0)
            took.add_metric([name], seconds)
        yield up
        yield took

    def close(self) -> None:
        self._forget_others(set())


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (every address) or ``PORT`` (localhost)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    elif not host:
        host = "0.0.0.0"
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not an address to listen on: {text!r} (expected HOST:PORT)")
    return host, int(port)


def serve(
    listen: str, state_dir: str | os.PathLike[str] | None, *, timeout: float = SCRAPE_TIMEOUT
) -> tuple[Any, threading.Thread, SandboxesCollector]:
    """Serve ``/metrics`` on ``listen`` from a thread; returns (server, thread, collector).

    ``server.shutdown()`` stops it. Every request scrapes every running sandbox.
    """
    from prometheus_client import start_http_server
    from prometheus_client.registry import CollectorRegistry

    host, port = parse_listen(listen)
    root = Path(state_dir) if state_dir is not None else None
    collector = SandboxesCollector(root, timeout=timeout)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    server, thread = start_http_server(port, host, registry)
    return server, thread, collector
