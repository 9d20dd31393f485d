"""Containers and their processes as the agent keeps them: records, stdio, rootfs, cgroups.

Nothing here knows about gRPC: ``manager.Manager`` raises :class:`errors.Failure` with a
status name, and ``services.containers`` turns records and failures into protocol messages.
"""
