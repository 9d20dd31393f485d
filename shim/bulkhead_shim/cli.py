"""The shim's command line, as containerd's runtime v2 contract calls it.

containerd runs ``containerd-shim-bulkhead-v2 -namespace NS -address SOCK -publish-binary BIN
-id ID [-debug] start`` in the bundle directory, and ``... -id ID -bundle DIR delete`` to clean up
after a shim that is gone. Flags are Go's ``flag`` style (one dash, ``-name value`` or
``-name=value``). ``serve`` is our own action: the long-running shim that ``start`` spawns.

Only the standard library is imported here: ``start`` and ``delete`` are on containerd's
critical path, and the heavy modules (grpc, the host client) load only where they are used.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

ACTIONS = ("start", "delete", "serve")
_VALUE_FLAGS = ("namespace", "address", "publish-binary", "id", "bundle", "socket")
_BOOL_FLAGS = ("debug", "v")


@dataclass
class Flags:
    action: str = "serve"
    namespace: str = ""
    address: str = ""  # containerd's gRPC socket
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    debug: bool = False
    socket: str = ""  # serve: the listening socket's path (fd 3 is the socket itself)

    @property
    def ttrpc_address(self) -> str:
        """Where events go: containerd passes ``$TTRPC_ADDRESS``; else its ttrpc socket's
        conventional name next to the gRPC one."""
        return os.environ.get("TTRPC_ADDRESS") or f"{self.address}.ttrpc"


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> Flags:
    flags = Flags()
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            if name == "debug":
                flags.debug = value.lower() not in ("false", "0") if eq else True
            continue
        if name not in _VALUE_FLAGS:
            raise UsageError(f"unknown flag -{name}")
        if not eq:
            if i >= len(argv):
                raise UsageError(f"flag -{name} needs a value")
            value = argv[i]
            i += 1
        setattr(flags, name.replace("-", "_"), value)
    if len(positional) > 1:
        raise UsageError(f"one action at most, not {positional}")
    if positional:
        if positional[0] not in ACTIONS:
            raise UsageError(f"unknown action {positional[0]!r}: use one of {', '.join(ACTIONS)}")
        flags.action = positional[0]
    if flags.action in ("start", "delete") and not flags.id:
        raise UsageError(f"{flags.action} needs -id")
    if flags.action in ("start", "serve") and not flags.namespace:
        flags.namespace = os.environ.get("NAMESPACE", "")
        if not flags.namespace:
            raise UsageError(f"{flags.action} needs -namespace")
    return flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-v"], ["--version"], ["version"]):
        from importlib.metadata import version

        print(f"containerd-shim-bulkhead-v2 (bulkhead {version('bulkhead')})")
        return 0
    try:
        flags = parse(argv)
    except UsageError as exc:
        print(f"containerd-shim-bulkhead-v2: {exc}", file=sys.stderr)
        return 2
    try:
        if flags.action == "start":
            from .start import start

            print(start(flags), end="")
            return 0
        if flags.action == "delete":
            from .delete import delete

            sys.stdout.buffer.write(delete(flags))
            sys.stdout.flush()
            return 0
        from .serve import serve

        return serve(flags)
    except Exception as exc:  # containerd shows stderr of a failed start/delete to the user
        print(f"containerd-shim-bulkhead-v2 {flags.action}: {exc}", file=sys.stderr)
        if flags.debug:
            import traceback

            traceback.print_exc()
        return 1
