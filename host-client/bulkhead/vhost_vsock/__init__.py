"""A userspace vhost-user-vsock backend: guest vsock without ``/dev/vhost-vsock``.

QEMU's ``vhost-user-vsock-pci`` device hands the guest's virtqueues to this
process over a unix socket; the process speaks the virtio-vsock stream
protocol to the guest and exposes it to host programs the way Firecracker and
Cloud Hypervisor do ("hybrid vsock"):

- host to guest: connect to the unix socket ``--uds-path``, write
  ``CONNECT <port>\\n``, read ``OK <host port>\\n``, then the socket carries
  the guest connection's bytes;
- guest to host: a guest connection to CID 2 port P reaches the unix socket
  ``<uds-path>_P`` if something listens there (else the guest gets a reset).

Run it as ``python -m bulkhead.vhost_vsock --socket S --cid N --uds-path P``
before starting QEMU with ``qemu_args.device_args()`` (QEMU asks the backend for
its configuration while it creates the device). Modules: ``protocol``
(vhost-user messages), ``memory`` (the guest memory table), ``virtqueue``
(split rings), ``packets`` (the virtio-vsock header), ``connections`` (the
stream state machine with credit-based flow control), ``backend`` (the event
loop that ties them to sockets), ``qemu_args`` (the QEMU command-line part).

This module imports nothing, so that ``bulkhead.qemu`` can use ``qemu_args``
cheaply.
"""
