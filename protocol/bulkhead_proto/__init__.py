"""Bulkhead's wire protocol, shared by the guest agent and the host client.

- ``bulkhead_proto.v1``: the gRPC API (``agent.proto`` and its generated code).
- ``bulkhead_proto.mux``: connection multiplexing over a single byte stream.
"""

PROTOCOL_VERSION = 1
