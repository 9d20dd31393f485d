"""Containers in one guest: the agent against crun, and stdio against the raw channel.

    python bench/containers.py [--runs 5] [--image DIR] [--accel auto] [--stdio-mib 50]

Boots one sandbox from the ``bench`` image variant (the default image plus Debian's crun;
built here if the cache lacks it) with ``bulkhead.bench=1``, and measures in that guest,
each figure beside its baseline, the runs of both interleaved:

- start: create + start + wait + remove of ``/bin/true``, from ``crun spec``'s config.json
  with only the args, the terminal and the root path changed. Bulkhead is timed twice:
  host-observed (the four RPCs from this process, host round trips over the emulated
  virtio-serial channel included: what a user pays) and guest-side (the same four RPCs
  from a gRPC client inside the guest, on the agent's own socket). crun: ``crun run`` of
  the same config (its create, start, wait and delete), timed in the guest.
- exec: ``/bin/true`` into a running container until its exit is reported
  (ExecProcess + WaitProcess, host-observed and guest-side) against ``crun exec``.
- stdio: ``head -c N /dev/zero`` in a container read on the host through ``Sandbox.run``
  (gRPC Attach, with the client's acks), against N zero bytes from the agent's bench-only
  raw source over the same bridge, mux, virtio-serial port, monitor and relay, without
  gRPC. Throughput from the first byte to EOF.

Guest-side figures come from a privileged helper container in the same guest: the guest's
own root (for python3, grpc and crun), its own cgroup namespace with crun's groups below its
cgroup (the agent removes them with it), and the agent's socket bound in. It times both
``crun`` and the in-guest gRPC client with the guest's clock, one line per request.

This is a benchmark, not a test: it prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bulkhead import Process, Sandbox
from bulkhead.qemu import choose_accel
from bulkhead.spec import default_mounts, make_exec_process, make_spec
from bulkhead_image.build import build_image
from bulkhead_image.cache import load_image

BUSYBOX_ROOTFS = "/usr/share/bulkhead/rootfs"
GUEST_AGENT_SOCKET = "/run/agent.sock"  # where the helper sees the agent's socket
RAW_MAGIC = b"BULKHEAD-BENCH-RAW\n"  # as bulkhead_agent.bridge.bench_raw
# Every capability this kernel knows (6.1): the helper is as privileged as a runtime.
_CAPABILITY_NAMES = """
CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE
NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO
SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME
SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG
WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE
"""
ALL_CAPABILITIES = [f"CAP_{name}" for name in _CAPABILITY_NAMES.split()]

# The helper's program, run by the guest's python3. One JSON request per stdin line, one
# JSON answer per stdout line; times in ms on the guest's monotonic clock.
DRIVER = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, "/usr/lib/bulkhead")
import grpc
from bulkhead_proto.v1 import agent_pb2 as pb, agent_pb2_grpc

# cgroup v2 lets only leaves hold processes once a group hands controllers down: leave the
# root of this cgroup namespace to crun's groups.
os.mkdir("/sys/fs/cgroup/driver")
with open("/sys/fs/cgroup/driver/cgroup.procs", "w") as f:
    f.write("0")
stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel("unix:" + sys.argv[1]))
NULL = subprocess.DEVNULL

def crun(*args):
    subprocess.run(["crun", *args], check=True, stdin=NULL, stdout=NULL)

def bundle(name, config, argv):
    path = "/tmp/" + name
    os.makedirs(path, exist_ok=True)
    config = dict(config, process=dict(config["process"], args=argv))
    config["linux"] = dict(config["linux"], cgroupsPath="/crun-" + name)
    with open(path + "/config.json", "w") as f:
        json.dump(config, f)
    return path

def agent_exited(reply):
    if reply.kind != pb.ProcessExit.EXITED or reply.exit_code != 0:
        raise RuntimeError(f"not a clean exit: {reply}")

def agent_start(cid, spec):
    stub.CreateContainer(pb.CreateContainerRequest(container_id=cid, oci_spec=spec))
    stub.StartContainer(pb.StartContainerRequest(container_id=cid))
    agent_exited(stub.WaitProcess(pb.WaitProcessRequest(container_id=cid)))
    stub.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))

def agent_exec(cid, eid, process):
    stub.ExecProcess(pb.ExecProcessRequest(container_id=cid, exec_id=eid, process=process))
    agent_exited(stub.WaitProcess(pb.WaitProcessRequest(container_id=cid, exec_id=eid)))

# The work a request asks for; all else (bundles, encoding) is done before the clock starts.
def prepare(req):
    op, cid = req["op"], req.get("id")
    if op == "crun-run":
        path = bundle("run", req["spec"], ["/bin/true"])
        return lambda: crun("run", "--bundle", path, cid)
    if op == "crun-exec-setup":
        path = bundle("exec", req["spec"], req["args"])
        return lambda: crun("run", "--detach", "--bundle", path, cid)
    if op == "crun-exec":
        return lambda: crun("exec", cid, "/bin/true")
    if op == "crun-delete":
        return lambda: crun("delete", "--force", cid)
    if op == "agent-start":
        spec = json.dumps(req["spec"]).encode()
        return lambda: agent_start(cid, spec)
    if op == "agent-exec":
        process = json.dumps(req["process"]).encode()
        return lambda: agent_exec(cid, req["exec_id"], process)
    raise ValueError(f"unknown op {op!r}")

def handle(req):
    if req["op"] == "crun-spec":
        os.makedirs("/tmp/spec", exist_ok=True)
        subprocess.run(["crun", "spec"], cwd="/tmp/spec", check=True)
        with open("/tmp/spec/config.json") as f:
            return {"spec": json.load(f)}
    work = prepare(req)
    t0 = time.monotonic_ns()
    work()
    return {"ms": (time.monotonic_ns() - t0) / 1e6}

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    try:
        answer = handle(json.loads(line))
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer), flush=True)
"""


class Helper:
    """The privileged helper container and its request/answer lines."""

    def __init__(self, sb: Sandbox) -> None:
        spec = make_spec(["/usr/bin/python3", "-I", "-S", "-c", DRIVER, GUEST_AGENT_SOCKET])
        spec["root"] = {"path": "/", "readonly": False}  # the guest's own root, overlaid
        caps = ALL_CAPABILITIES
        spec["process"]["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}
        spec["linux"].pop("maskedPaths")
        spec["linux"].pop("readonlyPaths")
        rw = ["nosuid", "noexec", "nodev"]
        spec["mounts"] = [
            *(m for m in default_mounts() if not m["destination"].startswith("/sys")),
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": rw},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": rw},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
            {
                "destination": GUEST_AGENT_SOCKET,
                "type": "bind",
                "source": "/run/bulkhead/agent.sock",
                "options": ["bind"],
            },
        ]
        self.proc = sb.run(spec=spec, stdin=True, name="bench-helper")
        self._lines = self._read_lines(self.proc)
        self._answer()  # ready: python, grpc and the cgroup move are done

    @staticmethod
    def _read_lines(proc: Process) -> Iterator[bytes]:
        pending = b""
        for chunk in proc.stdout:
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield line

    def _answer(self) -> dict[str, Any]:
        line = next(self._lines, None)
        if line is None:
            err = self.proc.stderr.read().decode(errors="replace")
            raise RuntimeError(f"the helper ended ({self.proc.exit}): {err}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the helper failed: {answer['error']}")
        return answer

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        return self._answer()

    def ms(self, op: str, **fields: Any) -> float:
        return float(self.ask(op, **fields)["ms"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return (time.monotonic() - start) * 1000


def host_start(sb: Sandbox, spec: bytes, cid: str) -> float:
    def once() -> None:
        sb.agent.create_container(cid, spec)
        sb.agent.start_container(cid)
        exit = sb.agent.wait_process(cid)
        sb.agent.remove_container(cid, timeout=0)
        if exit.returncode != 0:
            raise RuntimeError(f"/bin/true in {cid}: {exit}")

    return timed(once)


def host_exec(sb: Sandbox, cid: str, exec_id: str, process: bytes) -> float:
    def once() -> None:
        sb.agent.exec_process(cid, exec_id, process)
        exit = sb.agent.wait_process(cid, exec_id)
        if exit.returncode != 0:
            raise RuntimeError(f"/bin/true in {cid}/{exec_id}: {exit}")

    return timed(once)


def stream_rate(chunks: Iterator[bytes], expected: int) -> float:
    """MiB/s from the first chunk to the end (the first chunk's bytes are not counted)."""
    first = next(chunks)
    start = time.monotonic()
    total = len(first)
    for chunk in chunks:
        total += len(chunk)
    seconds = time.monotonic() - start
    if total != expected:
        raise RuntimeError(f"got {total} bytes, expected {expected}")
    return (total - len(first)) / seconds / 2**20


def stdio_rate(sb: Sandbox, size: int) -> float:
    proc = sb.run(["head", "-c", str(size), "/dev/zero"])
    rate = stream_rate((o.data for o in proc.output() if o.stream == "stdout"), size)
    if proc.wait(timeout=60) != 0:
        raise RuntimeError(f"head exited with {proc.exit}")
    return rate


def raw_rate(sb: Sandbox, size: int) -> float:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sb.agent_socket))
        sock.sendall(RAW_MAGIC + b"%d\n" % size)

        def chunks() -> Iterator[bytes]:
            while data := sock.recv(1 << 20):
                yield data

        return stream_rate(chunks(), size)


def bench_spec(crun_spec: dict[str, Any]) -> dict[str, Any]:
    """``crun spec``'s config with what must change: the command, no terminal, the root."""
    spec = json.loads(json.dumps(crun_spec))
    spec["process"]["args"] = ["/bin/true"]
    spec["process"]["terminal"] = False
    spec["root"]["path"] = BUSYBOX_ROOTFS  # read-only, as crun spec has it
    return spec


def row(label: str, ours: float, base: float, unit: str, aim: str = "") -> str:
    return f"  {label:34} {ours:9.1f}{unit:5} {base:9.1f}{unit:5} {ours / base:6.2f}x  {aim}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", type=Path, help="default: the bench variant, built if need be")
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--stdio-mib", type=int, default=50, help="bytes per stdio run, MiB")
    opts = parser.parse_args()

    if opts.image:
        image = load_image(opts.image)
    else:
        image = build_image(variant="bench", progress=lambda m: print(f"image: {m}", flush=True))
    if image.manifest.get("variant") != "bench":
        print(f"warning: {image.path} is not the bench variant (no crun)", file=sys.stderr)
    accel = choose_accel(opts.accel, kernel=image.kernel)
    size = opts.stdio_mib * 2**20
    runs = range(opts.runs + 1)  # run 0 warms caches up and is not counted
    figures: dict[str, list[float]] = {}

    def keep(name: str, i: int, value: float) -> None:
        if i > 0:
            figures.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory(prefix="bh-bench-") as state_dir:
        sb = Sandbox.up(
            "bench-containers",
            image=image.path,
            memory_mib=512,
            cpus=1,
            accel=accel.accel,
            state_dir=state_dir,
            extra_cmdline=["bulkhead.bench=1"],
        )
        try:
            features = sb.agent.guest_details().features
            if "bench-raw" not in features:
                raise RuntimeError(f"the agent offers no raw source (features: {features})")
            helper = Helper(sb)
            spec = bench_spec(helper.ask("crun-spec")["spec"])
            spec_bytes = json.dumps(spec).encode()
            true = make_exec_process(["/bin/true"])
            true_process = json.dumps(true).encode()
            sleeper = dict(spec, process=dict(spec["process"], args=["sleep", "100000"]))

            print(f"start: {opts.runs} runs (+1 warm-up) of each, interleaved", flush=True)
            for i in runs:
                keep("start crun", i, helper.ms("crun-run", spec=spec, id=f"crun-run-{i}"))
                keep("start guest", i, helper.ms("agent-start", spec=spec, id=f"g{i}"))
                keep("start host", i, host_start(sb, spec_bytes, f"h{i}"))

            print("exec: the same, into one running container each", flush=True)
            helper.ask("crun-exec-setup", spec=spec, args=["sleep", "100000"], id="crun-x")
            sb.agent.create_container("bulkhead-x", json.dumps(sleeper).encode())
            sb.agent.start_container("bulkhead-x")
            for i in runs:
                keep("exec crun", i, helper.ms("crun-exec", id="crun-x"))
                guest_ms = helper.ms("agent-exec", id="bulkhead-x", exec_id=f"g{i}", process=true)
                keep("exec guest", i, guest_ms)
                keep("exec host", i, host_exec(sb, "bulkhead-x", f"h{i}", true_process))
            helper.ask("crun-delete", id="crun-x")
            sb.agent.remove_container("bulkhead-x", timeout=0)
            helper.close()

            print(f"stdio: {opts.stdio_mib} MiB a run, raw and Attach interleaved", flush=True)
            for i in runs:
                keep("raw", i, raw_rate(sb, size))
                keep("stdio", i, stdio_rate(sb, size))
            memory = {p.name: p.uss_bytes for p in sb.agent.guest_details().processes}
        finally:
            sb.down(timeout=30)

    print()
    print(
        f"accelerator: {accel.accel} ({accel.reason}); runs: {opts.runs} (+1 warm-up); "
        f"image: {image.path.name[:16]} ({image.manifest.get('variant', 'default')}), "
        f"kernel {image.manifest['kernel_release']}; one vCPU"
    )
    report(figures, opts.stdio_mib)
    if agent_uss := memory.get("agent"):
        print(f"agent USS after the runs: {agent_uss / 2**20:.1f} MiB")
    return 0


# (name, title, [(label, ours, baseline, aim as (ratio, "<=" or ">=") or None)], unit)
SECTIONS = (
    (
        "start",
        "container start: create+start+wait+remove of /bin/true    baseline: crun run",
        [
            ("guest-side (in-guest gRPC client)", "start guest", "start crun", (0.5, "<=")),
            ("host-observed (host -> agent RPCs)", "start host", "start crun", None),
        ],
        "ms",
    ),
    (
        "exec",
        "exec of /bin/true until its exit is reported             baseline: crun exec",
        [
            ("guest-side (in-guest gRPC client)", "exec guest", "exec crun", (0.5, "<=")),
            ("host-observed (host -> agent RPCs)", "exec host", "exec crun", None),
        ],
        "ms",
    ),
    (
        "stdio",
        "stdio container -> host, first byte to EOF               baseline: raw channel",
        [("Attach stream vs raw bytes", "stdio", "raw", (0.8, ">="))],
        "MiB/s",
    ),
)

LEGEND = """\
what each figure includes:
  crun run, crun exec   the crun process, started by the in-guest driver (python subprocess)
                        until it exits; guest clock
  guest-side            the agent's RPCs from a python gRPC client in the guest, on the agent's
                        unix socket: no host round trip, but the client shares the one vCPU
  host-observed         the same RPCs from this process: gRPC over the emulated virtio-serial
                        port, the mux and the monitor's relay; host clock
  stdio                 head -c N /dev/zero in a container, read through Sandbox.run's Attach
                        stream (acks included) in this process
  raw                   N zero bytes from the agent's bench-only source, through the same
                        bridge, mux, virtio-serial port and relay, read from a plain socket\
"""


def report(figures: dict[str, list[float]], stdio_mib: int) -> None:
    med = {name: statistics.median(values) for name, values in figures.items()}
    print()
    print(f"  {'median':36} {'bulkhead':>14} {'baseline':>14} {'ratio':>7}  aim")
    standing = []
    for name, title, rows, unit in SECTIONS:
        print(title.replace("stdio container", f"stdio ({stdio_mib} MiB) container"))
        for label, ours, base, aim in rows:
            ratio = med[ours] / med[base]
            goal = ""
            if aim is not None:
                limit, sense = aim
                met = ratio <= limit if sense == "<=" else ratio >= limit
                goal = f"{sense} {limit}x: {'met' if met else 'not met'}"
                standing.append(f"{name} {ratio:.2f}x ({goal})")
            print(
                f"  {label:36} {med[ours]:9.1f} {unit:<4} {med[base]:9.1f} {unit:<4} "
                f"{ratio:6.2f}x  {goal}"
            )
    print()
    print("issue aims, where we stand: " + "; ".join(standing))
    print()
    print("all runs (ms; MiB/s for stdio and raw):")
    for name, values in figures.items():
        print(f"  {name:12} " + " ".join(f"{v:8.1f}" for v in values))
    print()
    print(LEGEND)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
