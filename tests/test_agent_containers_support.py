"""Helpers for the native container and stdio tests of the real agent (no tests here).

The agent runs as a subprocess (``test_agent_support.start_agent``) with a busybox root
filesystem built in a temp dir as its default rootfs; the tests talk to it over its unix
socket with the generated stub. Every call has a gRPC deadline and every wait a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_agent_support import Agent, short_tmpdir, start_agent

from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc

pb = agent_pb2
RPC_TIMEOUT = 20.0  # the deadline of every unary call
ACK_EVERY = 256 * 1024  # a well-behaved host acknowledges as it goes
# Every Attachment, so that teardown can end them all: gRPC reads a stream's requests on a
# thread of its own, blocked in our queue until it gets None. A thread left over would make
# later tests that fork the spawner refuse to (fork is unsafe with threads).
_ATTACHMENTS: list[Attachment] = []
STANDARD_NAMESPACES = ("pid", "mount", "uts", "ipc")


def build_busybox_rootfs(root: Path) -> None:
    """A minimal root: static busybox, a relative link per applet, the usual directories."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (apt-get install busybox-static)")
    kind = subprocess.run(["file", "-L", busybox], capture_output=True, text=True).stdout
    if "statically linked" not in kind and shutil.which("file"):
        pytest.skip("busybox is not static (apt-get install busybox-static)")
    for sub in ("bin", "proc", "dev", "sys", "tmp", "etc", "run", "root"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        if name != "busybox":
            os.symlink("busybox", root / "bin" / name)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    os.chmod(root, 0o755)


def make_spec(
    args: list[str],
    *,
    namespaces: tuple[str, ...] = STANDARD_NAMESPACES,
    hostname: str = "",
    env: list[str] | None = None,
    **process: Any,
) -> dict[str, Any]:
    """A spec like ``crun spec`` writes, trimmed: relative root (the default rootfs)."""
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "args": args,
            "cwd": "/",
            "env": env if env is not None else ["PATH=/bin", "HOME=/root", "TERM=xterm"],
            **process,
        },
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": t} for t in namespaces]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
        ],
    }
    if hostname:
        spec["hostname"] = hostname
    return spec


@dataclass
class Output:
    # bytearray: appending to bytes would copy everything so far each time (100 MB!)
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit: pb.ProcessExit | None = None
    chunks: int = 0
    largest_chunk: int = 0


class Attachment:
    """One Attach stream, driven from the test thread; requests go through a queue.

    ``collect`` checks every Output's offset against what was received before it: a gap or
    a duplicate fails the test on the spot.
    """

    def __init__(
        self,
        stub: agent_pb2_grpc.AgentStub,
        container_id: str,
        exec_id: str = "",
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        timeout: float = 60.0,
    ) -> None:
        self.requests: queue.Queue[pb.AttachRequest | None] = queue.Queue()
        self.requests.put(
            pb.AttachRequest(
                container_id=container_id,
                exec_id=exec_id,
                stdout_offset=stdout_offset,
                stderr_offset=stderr_offset,
            )
        )
        self.call = stub.Attach(iter(self.requests.get, None), timeout=timeout)
        self.received = {"stdout": stdout_offset, "stderr": stderr_offset}
        self.acked = dict(self.received)
        _ATTACHMENTS.append(self)

    def send(self, **fields: Any) -> None:
        self.requests.put(pb.AttachRequest(**fields))

    def ack(self) -> None:
        self.send(ack_stdout=self.received["stdout"], ack_stderr=self.received["stderr"])
        self.acked = dict(self.received)

    def close_requests(self) -> None:
        self.requests.put(None)

    def cancel(self) -> None:
        self.call.cancel()
        self.requests.put(None)

    def next(self) -> pb.AttachResponse | None:
        """The next response, offsets checked; None at the end of the stream."""
        try:
            response = next(self.call)
        except StopIteration:
            self.close_requests()  # frees gRPC's thread blocked reading our queue
            return None
        except BaseException:
            self.close_requests()
            raise
        kind = response.WhichOneof("event")
        if kind in ("stdout", "stderr"):
            output = getattr(response, kind)
            assert output.offset == self.received[kind], (
                f"{kind}: got offset {output.offset}, expected {self.received[kind]}"
            )
            assert 0 < len(output.data) <= 64 * 1024
            self.received[kind] += len(output.data)
        return response

    def collect(
        self, out: Output | None = None, *, auto_ack: bool = True, limit: int | None = None
    ) -> Output:
        """Read until ``exit`` (or until ``limit`` stdout bytes), acknowledging as it goes."""
        out = out or Output()
        while limit is None or len(out.stdout) < limit:
            response = self.next()
            if response is None:
                break
            kind = response.WhichOneof("event")
            if kind == "exit":
                out.exit = response.exit
                assert self.next() is None, "nothing may follow the exit"
                break
            data = getattr(response, kind).data
            if kind == "stdout":
                out.stdout += data
            else:
                out.stderr += data
            out.chunks += 1
            out.largest_chunk = max(out.largest_chunk, len(data))
            unacked = sum(self.received.values()) - sum(self.acked.values())
            if auto_ack and unacked >= ACK_EVERY:
                self.ack()
        return out


class Client:
    """The stub with deadlines, and the few sequences every test repeats."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = agent_pb2_grpc.AgentStub(channel)

    def create(self, container_id: str, spec: dict[str, Any] | bytes, bundle_dir: str = "") -> int:
        raw = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
        request = pb.CreateContainerRequest(
            container_id=container_id, oci_spec=raw, bundle_dir=bundle_dir
        )
        reply = self.stub.CreateContainer(request, timeout=RPC_TIMEOUT)
        return reply.pid

    def start(self, container_id: str) -> None:
        self.stub.StartContainer(
            pb.StartContainerRequest(container_id=container_id), timeout=RPC_TIMEOUT
        )

    def wait(self, container_id: str, exec_id: str = "", timeout: float = RPC_TIMEOUT) -> Any:
        return self.stub.WaitProcess(
            pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id), timeout=timeout
        )

    def remove(self, container_id: str, timeout_ms: int = 0) -> None:
        self.stub.RemoveContainer(
            pb.RemoveContainerRequest(container_id=container_id, timeout_ms=timeout_ms),
            timeout=RPC_TIMEOUT,
        )

    def exec(self, container_id: str, exec_id: str, process: dict[str, Any]) -> int:
        reply = self.stub.ExecProcess(
            pb.ExecProcessRequest(
                container_id=container_id, exec_id=exec_id, process=json.dumps(process).encode()
            ),
            timeout=RPC_TIMEOUT,
        )
        return reply.pid

    def signal(self, container_id: str, signo: int, exec_id: str = "", all_: bool = False) -> None:
        self.stub.SignalProcess(
            pb.SignalProcessRequest(
                container_id=container_id, exec_id=exec_id, signal=signo, all=all_
            ),
            timeout=RPC_TIMEOUT,
        )

    def list(self) -> dict[str, pb.ContainerInfo]:
        reply = self.stub.ListContainers(pb.ListContainersRequest(), timeout=RPC_TIMEOUT)
        return {c.container_id: c for c in reply.containers}

    def run(
        self, container_id: str, spec: dict[str, Any], *, bundle_dir: str = "", remove: bool = True
    ) -> Output:
        """create, attach, start, collect until exit, (remove): ``bulkhead run``'s sequence."""
        self.create(container_id, spec, bundle_dir)
        try:
            attachment = Attachment(self.stub, container_id)
            self.start(container_id)
            return attachment.collect()
        finally:
            if remove:
                self.remove(container_id)


@dataclass
class AgentEnv:
    agent: Agent
    rootfs: Path
    workdir: Path
    channel: grpc.Channel = field(init=False)
    client: Client = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.agent.target)
        self.client = Client(self.channel)

    @property
    def containers_dir(self) -> Path:
        return self.agent.run_dir / "containers"


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in our mount namespace (the agent's too)."""
    prefix = str(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].encode().decode("unicode_escape")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return found


@contextlib.contextmanager
def running_agent(env: dict[str, str] | None = None) -> Iterator[AgentEnv]:
    """The agent with a fresh busybox default rootfs; checks it stops cleanly, mounts gone."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, mounts)")
    with short_tmpdir() as tmp:
        rootfs = tmp / "rootfs"
        build_busybox_rootfs(rootfs)
        full_env = {
            "BULKHEAD_DEFAULT_ROOTFS": str(rootfs),
            # Not the machine's /sys/fs/cgroup, which may well be cgroup2: no cgroups unless
            # a test asks for a tree of its own.
            "BULKHEAD_CGROUP_DIR": str(tmp / "no-cgroup" / "bulkhead"),
            **(env or {}),
        }
        agent = start_agent(tmp, tcp=False, env=full_env)
        state = AgentEnv(agent, rootfs, tmp)
        try:
            yield state
        finally:
            while _ATTACHMENTS:
                _ATTACHMENTS.pop().cancel()
            state.channel.close()
            code = agent.stop()
            left = mounts_under(tmp)
            for target in reversed(left):  # never leave a test's mounts on the machine
                subprocess.run(["umount", "-l", target], check=False)
            assert code == 0, agent.log()
            assert left == [], f"mounts left behind: {left}\n{agent.log()}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
