"""The ``bulkhead`` command: build the guest image, run sandboxes, look inside them.

Expected failures print ``bulkhead: error: <message>`` and exit 1 (2 for
usage errors; ``run`` and ``exec`` exit 125, leaving the rest to the container's
own status, as docker does); every read command takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from . import cli_containers, cli_metrics, cli_network, cli_storage
from .errors import BulkheadError, ImageNotFound
from .qemu import ACCELS, TRANSPORT_CHOICES
from .sandbox import DEFAULT_HOTPLUG_PORTS, Sandbox, SandboxDetails

MiB = 1024 * 1024
# As bulkhead_image.variants.VARIANTS (not imported here: the builder loads only to build).
IMAGE_VARIANTS = ("default", "bench")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = cli_containers.parse_args(_parser, argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "func"):
        _parser().print_usage(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except BulkheadError as exc:
        _error(str(exc))
    except OSError as exc:  # permissions, a full disk: the message says enough
        _error(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        status = cli_containers.terminated_status(exc)
        if status is None:
            raise
        return status
    return getattr(args, "error_status", 1)


def _error(message: str) -> None:
    print(f"bulkhead: error: {message}", file=sys.stderr)


def _parser(command_nargs: Any = argparse.REMAINDER) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bulkhead", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where sandbox state lives (default: $BULKHEAD_STATE_DIR, /run/bulkhead as root)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is going on")
    groups = parser.add_subparsers(
        title="commands",
        metavar=(
            "{image,sandbox,run,exec,ps,kill,rm,pause,resume,stats,metrics,events,"
            "storage,disk,cp,network}"
        ),
    )

    image = groups.add_parser("image", help="the guest image").add_subparsers(metavar="COMMAND")
    p = image.add_parser("build", help="build the guest kernel + initramfs into the cache")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument(
        "--cache-dir", type=Path, help="default: $BULKHEAD_CACHE_DIR or ~/.cache/bulkhead"
    )
    p.add_argument(
        "--variant",
        choices=IMAGE_VARIANTS,
        default="default",
        help="default: default; bench adds crun for bench/containers.py (cached separately)",
    )
    p.set_defaults(func=cmd_image_build)
    cli_storage.add_image_parsers(image)
    p = image.add_parser("ls", help="list the images in the cache")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_image_ls)

    sandbox = groups.add_parser("sandbox", help="sandbox VMs").add_subparsers(metavar="COMMAND")
    p = sandbox.add_parser("up", help="boot a sandbox and wait until its agent is ready")
    p.add_argument("name")
    p.add_argument("--memory", type=int, default=512, metavar="MIB", help="default: 512")
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="default: 1")
    p.add_argument("--image", type=Path, metavar="DIR", help="default: the newest cached image")
    p.add_argument("--accel", choices=ACCELS, default="auto", help="default: auto (probe KVM)")
    p.add_argument("--boot-timeout", type=float, default=120.0, metavar="S", help="default: 120")
    p.add_argument("--debug-console", action="store_true", help="a shell on the guest console")
    add_transport_option(p)
    cli_network.add_up_options(p)
    p.add_argument(
        "--hotplug-ports",
        type=int,
        default=DEFAULT_HOTPLUG_PORTS,
        metavar="N",
        help=f"empty PCIe ports for disks and shares (default: {DEFAULT_HOTPLUG_PORTS}, max 15)",
    )
    p.add_argument(
        "--shared-memory", action="store_true", help="guest RAM shareable: needed by -v shares"
    )
    p.add_argument(
        "--pmem-slots", type=int, default=0, metavar="N", help="memory slots for virtio-pmem"
    )
    p.add_argument(
        "--9p",
        dest="ninep",
        action="append",
        default=[],
        metavar="HOSTDIR:TAG[:ro]",
        help="share a host directory over 9p from boot (mount it: storage add-9p)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_up)
    p = sandbox.add_parser("ls", help="list sandboxes (and clean up dead ones)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_ls)
    p = sandbox.add_parser("info", help="guest details and the boot timeline")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_info)
    p = sandbox.add_parser("down", help="shut a sandbox down (forced after the timeout)")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="default: 30")
    p.set_defaults(func=cmd_sandbox_down)
    p = sandbox.add_parser("console", help="print the guest console log")
    p.add_argument("name")
    p.set_defaults(func=cmd_sandbox_console)

    cli_containers.add_parsers(groups, command_nargs)
    cli_storage.add_parsers(groups)
    cli_metrics.add_parsers(groups)
    cli_network.add_parsers(groups)
    return parser


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


# -- image --


def cmd_image_build(args: argparse.Namespace) -> int:
    from bulkhead_image.build import build_image

    def progress(*parts: object) -> None:
        print("image:", *parts, file=sys.stderr, flush=True)

    info = build_image(args.cache_dir, force=args.force, progress=progress, variant=args.variant)
    size = Path(info.initramfs).stat().st_size
    print(f"image      {info.path}")
    print(f"kernel     {info.manifest.get('kernel_release', '?')}  ({info.kernel})")
    print(f"initramfs  {size / MiB:.1f} MiB  ({info.initramfs})")
    return 0


def cmd_image_ls(args: argparse.Namespace) -> int:
    from bulkhead_image import cache

    cache_dir = Path(args.cache_dir) if args.cache_dir else cache.default_cache_dir()
    latest = {v: cache.latest_image(cache_dir, v) for v in IMAGE_VARIANTS}
    images = []
    for directory in sorted((cache_dir / "images").glob("*/")):
        try:
            info = cache.load_image(directory)
        except (OSError, ValueError):  # half-built or foreign directories are not images
            continue
        variant = info.manifest.get("variant", "default")
        newest = latest.get(variant)
        images.append(
            {
                "path": str(info.path),
                "variant": variant,
                "latest": newest is not None and Path(newest.path) == Path(info.path),
                "kernel_release": info.manifest.get("kernel_release"),
                "initramfs_bytes": Path(info.initramfs).stat().st_size,
                "built": Path(info.initramfs).stat().st_mtime,
            }
        )
    if args.json:
        _print_json(images)
        return 0
    if not images:
        raise ImageNotFound(f"no images in {cache_dir}: run `bulkhead image build`")
    for img in images:
        mark = "*" if img["latest"] else " "
        size = img["initramfs_bytes"] / MiB
        variant = "" if img["variant"] == "default" else f"  ({img['variant']})"
        print(
            f"{mark} {img['path']}  kernel {img['kernel_release']}  initramfs {size:.1f} MiB"
            + variant
        )
    return 0


# -- sandbox --


def add_transport_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--transport",
        choices=TRANSPORT_CHOICES,
        default=None,
        help="the agent's channel: auto (vhost-vsock if the host has it, else serial; "
        "$BULKHEAD_TRANSPORT overrides), vsock (the userspace backend without vhost-vsock), "
        "serial, or a mode by name",
    )


def cmd_sandbox_up(args: argparse.Namespace) -> int:
    sb = Sandbox.up(
        args.name,
        memory_mib=args.memory,
        cpus=args.cpus,
        image=args.image,
        accel=args.accel,
        boot_timeout=args.boot_timeout,
        state_dir=args.state_dir,
        debug_console=args.debug_console,
        hotplug_ports=args.hotplug_ports,
        shared_memory=args.shared_memory,
        pmem_slots=args.pmem_slots,
        ninep_shares=args.ninep,
        transport=args.transport,
        **cli_network.up_kwargs(args),
    )
    info = sb.status()
    sb.close()
    if args.json:
        _print_json({**info.to_dict(), "boot_seconds": sb.boot_seconds})
        return 0
    print(
        f"sandbox {info.name} is up: agent ready after {sb.boot_seconds:.1f} s "
        f"({info.accel}, {info.memory_mib} MiB, {_cpus(info.cpus)}, agent over {info.transport}, "
        f"qemu pid {info.qemu_pid})"
    )
    return 0


def cmd_sandbox_ls(args: argparse.Namespace) -> int:
    infos = Sandbox.list(args.state_dir)
    # Report the dead once, then clear them away.
    if any(not i.alive for i in infos):
        Sandbox.cleanup_dead(args.state_dir)
    if args.json:
        _print_json([i.to_dict() for i in infos])
        return 0
    if not infos:
        print("no sandboxes")
        return 0
    rows = [("NAME", "STATUS", "ACCEL", "MEMORY", "CPUS", "QEMU PID", "AGE")]
    for i in infos:
        rows.append(
            (
                i.name,
                i.status + (" (removed)" if not i.alive else ""),
                i.accel or "-",
                f"{i.memory_mib} MiB" if i.memory_mib else "-",
                str(i.cpus or "-"),
                str(i.qemu_pid or "-"),
                _age(i.created),
            )
        )
    _table(rows)
    return 0


def cmd_sandbox_info(args: argparse.Namespace) -> int:
    details = Sandbox.get(args.name, state_dir=args.state_dir).info()
    if args.json:
        _print_json(details.to_dict())
    else:
        _print_details(details)
    return 0


def cmd_sandbox_down(args: argparse.Namespace) -> int:
    sb = Sandbox.get(args.name, state_dir=args.state_dir)
    started = time.monotonic()
    sb.down(timeout=args.timeout)
    print(f"sandbox {args.name} is down ({time.monotonic() - started:.1f} s)")
    return 0


def cmd_sandbox_console(args: argparse.Namespace) -> int:
    log = Sandbox.get(args.name, state_dir=args.state_dir).console_log()
    sys.stdout.write(log)
    return 0


# -- formatting --


def _print_details(d: SandboxDetails) -> None:
    s, g = d.sandbox, d.guest

    def field(label: str, text: str) -> None:
        print(f"{label:<10} {text}")

    field("sandbox", f"{s.name} ({s.status}), up {_age(s.created)}, {s.dir}")
    field("host", f"monitor pid {s.monitor_pid}, qemu pid {s.qemu_pid}, {s.accel} (-cpu {s.cpu})")
    field("guest", f"kernel {g.kernel_release}, hostname {g.hostname}")
    field("", f"uptime {g.uptime_seconds:.1f} s")
    field("", f"{_cpus(g.cpus)}, {g.memory_total_bytes / MiB:.0f} MiB, cgroup v{g.cgroup_version}")
    field(
        "agent",
        f"{g.agent_version} (protocol {g.protocol_version}), pid {g.agent_pid}, "
        f"restarts {g.agent_restarts}; init {g.init_version}",
    )
    field("features", ", ".join(g.features) or "-")
    field("modules", ", ".join(g.kernel_modules) or "-")
    label = "boot"
    for phase, ms in g.boot.phases().items():
        field(label, f"{phase:<26} {ms:8.1f} ms")
        label = ""
    field("", f"{'agent ready (since kernel)':<26} {g.boot.agent_ready_ms:8.1f} ms")
    label = "memory"
    for p in g.processes:
        field(
            label,
            f"pid {p.pid:<5} {p.name:<16} rss {p.rss_bytes / MiB:6.1f} MiB  "
            f"uss {p.uss_bytes / MiB:6.1f} MiB  pss {p.pss_bytes / MiB:6.1f} MiB  "
            f"{p.threads} threads",
        )
        label = ""


def _cpus(n: int | None) -> str:
    return f"{n} CPU" if n == 1 else f"{n} CPUs"


def _age(created: float) -> str:
    if not created:
        return "-"
    seconds = max(0, int(time.time() - created))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
