"""containerd runtime v2 shim for Bulkhead: ``containerd-shim-bulkhead-v2``.

containerd starts the shim once per pod (``start``), talks ttrpc to it (the
``containerd.task.v2.Task`` service, mapped onto the guest agent through the host
client), and runs ``delete`` to clean up after a shim that is gone.
"""
