"""The QEMU arguments that attach a vhost-user-vsock device to this backend."""

from __future__ import annotations

import os

CHARDEV_ID = "bh-vsock"


def _opt(value: object) -> str:
    # A value inside a QEMU "key=value,..." option: commas are doubled.
    return str(value).replace(",", ",,")


def device_args(
    socket_path: str | os.PathLike[str], *, machine: str = "q35", chardev_id: str = CHARDEV_ID
) -> list[str]:
    """``-chardev`` + ``-device`` for a vhost-user-vsock device served at ``socket_path``.

    QEMU is the client: the backend must already listen on ``socket_path``,
    and guest RAM must be shared (``memory-backend-memfd,share=on``, which
    ``QemuConfig.shared_memory`` gives), or the backend cannot reach the rings.
    The guest CID is the backend's (``--cid``): QEMU reads it from the
    backend's device configuration.
    """
    kind = "vhost-user-vsock-pci" if machine == "q35" else "vhost-user-vsock-device"
    return [
        "-chardev",
        f"socket,id={chardev_id},path={_opt(os.fspath(socket_path))}",
        "-device",
        f"{kind},chardev={chardev_id}",
    ]
