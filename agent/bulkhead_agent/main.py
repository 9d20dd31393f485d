"""Agent entry point: settings, its own cgroup, the spawner, gRPC server, transport bridges,
then SERVING.

Started by PID 1 as ``python3 -I -S`` with ``/usr/lib/bulkhead`` on sys.path.
Only the standard library and a few tiny modules are imported at first; grpc
and protobuf come in with ``server`` once logging works, so an import failure
is reported on the console rather than lost.

The spawner is forked before that (DESIGN decision 4): gRPC starts threads, and fork()
copies only the calling thread; and the smaller the agent is at the fork, the cheaper the
fork. The agent moves into its own cgroup first, so the spawner starts out there too.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from bulkhead_agent.bridge import Bridge
from bulkhead_agent.containers import agent_cgroup
from bulkhead_agent.settings import Settings, from_config
from bulkhead_agent.spawner.client import Spawner
from bulkhead_init import cmdline
from bulkhead_init.log import Logger, boottime_ms

OOM_SCORE_ADJ = -997  # like the kernel's own helpers: killed last, but still killable
STOP_GRACE_S = 1.0  # init waits 3 s before SIGKILL; leave it room to sync and unmount


def main() -> None:
    started_ms = boottime_ms()
    config, warnings = cmdline.read()
    settings, env_warnings = from_config(config)
    log = Logger("agent", settings.log)
    for warning in (*warnings, *env_warnings):
        log.warning(warning)
    _protect_from_oom(log)
    cgroup_dir = agent_cgroup.setup(settings.cgroup_dir, log)
    spawner = Spawner.launch()
    try:
        code = asyncio.run(_run(settings, started_ms, log, spawner, cgroup_dir))
    except Exception as exc:
        log.error(f"agent failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        spawner.close(kill=True)
    sys.exit(code)


def _protect_from_oom(log: Logger) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError as exc:
        log.debug(f"cannot set oom_score_adj: {exc}")


async def _run(
    settings: Settings, started_ms: float, log: Logger, spawner: Spawner, cgroup_dir: str | None
) -> int:
    # grpc and protobuf come in here, after logging works.
    from bulkhead_agent.containers.cgroup_tree import CgroupTree
    from bulkhead_agent.containers.manager import Manager
    from bulkhead_agent.server import AgentServer
    from bulkhead_agent.state import AgentState

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
    server = AgentServer(state, log, containers)
    await server.start()

    bridges, features = await _start_bridges(settings, log)
    extra = ["containers", *(["cgroup2"] if cgroup_dir else [])]
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
    # The guest is going down (or the agent restarts and could not find them again):
    # leave no process, mount or cgroup behind.
    await containers.shutdown()
    log.info("stopped")
    return 0


async def _start_bridges(settings: Settings, log: Logger) -> tuple[list[Bridge], list[str]]:
    """Start each configured transport; one that cannot start is logged and skipped."""
    bridges: list[Bridge] = []
    features: list[str] = []
    sock = settings.socket_path

    if settings.vsock_port:
        from bulkhead_agent.bridge.vsock import VsockBridge

        vsock = VsockBridge(settings.vsock_port, sock, log)
        if await vsock.start():
            bridges.append(vsock)
            features.append("vsock")

    if settings.serial_device or settings.serial_port:
        from bulkhead_agent.bridge.serial import SerialBridge, find_port

        path = settings.serial_device or find_port(settings.serial_port)
        if path is None:
            log.warning(f"serial: no virtio-serial port named {settings.serial_port!r}; serial off")
        else:
            serial = SerialBridge(path, sock, log)
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
