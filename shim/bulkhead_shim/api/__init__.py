"""containerd's wire types, written for Bulkhead as .proto files and generated here.

Regenerate with ``python protocol/generate.py``. The proto packages and message names are
containerd's own (containerd decodes Any payloads by full message name), so the modules
here hold ``containerd.task.v2``, ``containerd.events``, ``ttrpc`` and friends.
"""
