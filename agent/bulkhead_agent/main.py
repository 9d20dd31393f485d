"""Agent entry point: settings, its own cgroup, the spawner, gRPC server, transport bridges,
then SERVING.

Started by PID 1 as ``python3 -I -S`` with ``/usr/lib/bulkhead`` on sys.path.
Only the standard library and a few tiny modules are imported at first; grpc
and protobuf come in with ``server`` once logging works, so an import failure
is reported on the console rather than lost.

The spawner is forked before that (DESIGN decision 4): gRPC starts threads, and fork()
copies only the calling thread; and the smaller the agent is at the fork, the cheaper the
fork. The agent moves into its own cgroup first, so the spawner starts out there too.

Unless a spawner is already there: one that a previous agent left when it died, still
listening on ``<run dir>/spawner.sock`` with every container process. Then this agent adopts
it and the containers (DESIGN decision 5; docs/internals.md, "Re-adoption"). Only an orderly
stop (SIGTERM, SIGINT) removes the containers and ends the spawner; an agent that fails
leaves them to the next one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from bulkhead_agent.bridge import Bridge
from bulkhead_agent.containers import agent_cgroup
from bulkhead_agent.settings import Settings, from_config
from bulkhead_agent.spawner.client import Adopted, AdoptionError, Spawner
from bulkhead_init import cmdline
from bulkhead_init.log import Logger, boottime_ms

OOM_SCORE_ADJ = -997  # like the kernel's own helpers: killed last, but still killable
STOP_GRACE_S = 1.0  # init waits 3 s before SIGKILL; leave it room to sync and unmount
# For a spawner left by a previous agent to hand its processes over. It answers once it has
# noticed that agent's end, at once unless busy; generous, as a loaded one-vCPU guest is slow.
ADOPT_TIMEOUT_S = 15.0
SPAWNER_SOCKET = "spawner.sock"


def main() -> None:
    started_ms = boottime_ms()
    config, warnings = cmdline.read()
    settings, env_warnings = from_config(config)
    log = Logger("agent", settings.log)
    for warning in (*warnings, *env_warnings):
        log.warning(warning)
    _protect_from_oom(log)
    cgroup_dir = agent_cgroup.setup(settings.cgroup_dir, log)
    spawner, adopted = _spawner(settings, log)
    stopped = False
    try:
        code = asyncio.run(_run(settings, started_ms, log, spawner, adopted, cgroup_dir))
        stopped = True
    except Exception as exc:
        log.error(f"agent failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        if stopped:
            spawner.close(kill=True)
        else:
            # Not asked to stop: the containers go on, for the agent init starts next.
            spawner.detach()
    sys.exit(code)


def _spawner(settings: Settings, log: Logger) -> tuple[Spawner, list[Adopted] | None]:
    """The spawner a previous agent left (and what it has), or a new one (and None)."""
    path = os.path.join(settings.run_dir, SPAWNER_SOCKET)
    os.makedirs(settings.run_dir, 0o711, exist_ok=True)
    try:
        found = Spawner.connect(path, timeout=ADOPT_TIMEOUT_S)
    except AdoptionError as exc:
        # Its processes are beyond reach now; their cgroups are removed with the leftovers.
        log.error(f"{exc}; starting a new spawner")
        found = None
    if found is not None:
        spawner, adopted = found
        log.info(f"adopted the spawner (pid {spawner.pid}) with {len(adopted)} processes")
        return spawner, adopted
    return Spawner.launch(listen=path), None


def _protect_from_oom(log: Logger) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError as exc:
        log.debug(f"cannot set oom_score_adj: {exc}")


async def _run(
    settings: Settings,
    started_ms: float,
    log: Logger,
    spawner: Spawner,
    adopted: list[Adopted] | None,
    cgroup_dir: str | None,
) -> int:
    # grpc and protobuf come in here, after logging works.
    from bulkhead_agent.containers.cgroup_tree import CgroupTree
    from bulkhead_agent.containers.manager import Manager
    from bulkhead_agent.server import AgentServer
    from bulkhead_agent.state import AgentState
    from bulkhead_agent.storage.manager import StorageManager

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    state = AgentState(settings=settings, started_ms=started_ms)
    containers = Manager(settings, spawner, CgroupTree(cgroup_dir) if cgroup_dir else None, log)
    try:
        containers.prepare()
    except OSError as exc:  # creating containers will say so again, per request
        log.error(f"cannot prepare {settings.containers_dir}: {exc}")
    try:
        await containers.adopt(adopted)  # before serving: requests must find them
    except Exception as exc:  # serve what was adopted rather than fail again and again
        log.error(f"adopting containers: {type(exc).__name__}: {exc}")
    storages = StorageManager(settings.run_dir, log)
    try:
        storages.prepare()
    except OSError as exc:  # adding storages will fail and say so
        log.error(f"cannot prepare the storage directories: {exc}")
    server = AgentServer(state, log, containers, storages)
    containers.shared_files = server.network_files.binds()  # resolv.conf, hosts, hostname
    await server.start()

    bridges, features = await _start_bridges(settings, log)
    extra = ["containers", "storage", "network", *(["cgroup2"] if cgroup_dir else [])]
    state.features = ["health", "reflection", *extra, *features]
    await server.set_serving()
    state.ready_ms = boottime_ms()
    log.info(
        f"ready in {state.ready_ms - started_ms:.0f} ms on {server.socket_path}"
        f" (transports: {', '.join(features) or 'none'})"
    )

    await stop.wait()
    log.info("stopping")
    for bridge in bridges:
        bridge.stop_accepting()
    await server.stop(STOP_GRACE_S)
    for bridge in bridges:
        bridge.close()
    # Asked to stop: the guest is going down. Leave no process, mount or cgroup behind.
    await containers.shutdown()
    await storages.shutdown()  # after the containers, which may use them
    log.info("stopped")
    return 0


async def _start_bridges(settings: Settings, log: Logger) -> tuple[list[Bridge], list[str]]:
    """Start each configured transport; one that cannot start is logged and skipped."""
    bridges: list[Bridge] = []
    features: list[str] = []
    sock = settings.socket_path
    raw_socket_path = None
    if settings.bench:  # benchmark only: a byte source without gRPC (see bench_raw)
        from bulkhead_agent.bridge.bench_raw import RawSource

        source = RawSource(settings.run_dir, log)
        if await source.start():
            bridges.append(source)
            features.append("bench-raw")
            raw_socket_path = source.path

    if settings.vsock_port:
        from bulkhead_agent.bridge.vsock import VsockBridge

        vsock = VsockBridge(settings.vsock_port, sock, log)
        if await vsock.start():
            bridges.append(vsock)
            features.append("vsock")
            if raw_socket_path is not None:
                # Benchmark only: the raw source on the next vsock port, host CID only
                # like the agent's (the serial bridge finds it by its magic instead).
                raw = VsockBridge(settings.vsock_port + 1, raw_socket_path, log)
                if await raw.start():
                    bridges.append(raw)
                    features.append("bench-raw-vsock")

    if settings.serial_device or settings.serial_port:
        from bulkhead_agent.bridge.serial import SerialBridge, find_port

        path = settings.serial_device or find_port(settings.serial_port)
        if path is None:
            log.warning(f"serial: no virtio-serial port named {settings.serial_port!r}; serial off")
        else:
            serial = SerialBridge(path, sock, log, raw_socket_path)
            if serial.start():
                bridges.append(serial)
                features.append("serial")

    if settings.tcp_port:
        from bulkhead_agent.bridge.tcp import TcpBridge

        tcp = TcpBridge(settings.tcp_port, sock, log)
        if await tcp.start():
            bridges.append(tcp)
            features.append("tcp")

    return bridges, features
