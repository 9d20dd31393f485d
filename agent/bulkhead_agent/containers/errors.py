"""The one error type the container code raises towards the RPC layer, and id rules."""

from __future__ import annotations

import re

# CreateContainerRequest.container_id (and exec_id): [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Failure(Exception):
    """A request failed; ``code`` names a gRPC status (``NOT_FOUND``, ``INVALID_ARGUMENT``...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_id(value: str, field: str) -> None:
    if not _ID.fullmatch(value):
        raise Failure(
            "INVALID_ARGUMENT",
            f"{field}: {value!r} does not match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}",
        )
