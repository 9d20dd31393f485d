"""Bulkhead guest agent.

Runs inside the guest VM, started by PID 1. Serves gRPC on a private unix
socket and bridges the host transports (vsock, virtio-serial, dev-only TCP)
to it. See docs/internals.md for the contracts it keeps.
"""

# A plain constant rather than importlib.metadata: the guest has no dist-info
# and the lookup would cost imports at every start.
__version__ = "0.1.0"
