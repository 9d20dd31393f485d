"""Every error the host client raises on purpose derives from ``BulkheadError``.

Agent errors mirror gRPC status codes one class each, so callers catch what
they mean (``except NotFound``) instead of comparing codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import grpc


class BulkheadError(Exception):
    """Base class of all Bulkhead host-client errors."""


class TransportError(BulkheadError):
    """The byte channel to the guest agent could not be opened."""


class AgentError(BulkheadError):
    """The agent (or the channel to it) failed an RPC.

    ``code`` is the ``grpc.StatusCode``; ``details`` is the server's message.
    """

    # By name, so that importing the errors does not import grpc (the monitor
    # process never needs it).
    code_name: ClassVar[str] = "UNKNOWN"

    def __init__(
        self, details: str, *, code: grpc.StatusCode | None = None, method: str = ""
    ) -> None:
        # A plain AgentError can carry any code; the subclasses carry their own.
        self._code_name = code.name if code is not None else self.code_name
        self.details = details
        self.method = method
        where = f" ({method})" if method else ""
        super().__init__(f"{self._code_name}: {details}{where}")

    @property
    def code(self) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self._code_name]


class Cancelled(AgentError):
    code_name = "CANCELLED"


class Unknown(AgentError):
    code_name = "UNKNOWN"


class InvalidArgument(AgentError):
    code_name = "INVALID_ARGUMENT"


class DeadlineExceeded(AgentError):
    code_name = "DEADLINE_EXCEEDED"


class NotFound(AgentError):
    code_name = "NOT_FOUND"


class AlreadyExists(AgentError):
    code_name = "ALREADY_EXISTS"


class PermissionDenied(AgentError):
    code_name = "PERMISSION_DENIED"


class ResourceExhausted(AgentError):
    code_name = "RESOURCE_EXHAUSTED"


class FailedPrecondition(AgentError):
    code_name = "FAILED_PRECONDITION"


class Aborted(AgentError):
    code_name = "ABORTED"


class OutOfRange(AgentError):
    code_name = "OUT_OF_RANGE"


class Unimplemented(AgentError):
    code_name = "UNIMPLEMENTED"


class Internal(AgentError):
    code_name = "INTERNAL"


class Unavailable(AgentError):
    code_name = "UNAVAILABLE"


class DataLoss(AgentError):
    code_name = "DATA_LOSS"


class Unauthenticated(AgentError):
    code_name = "UNAUTHENTICATED"


_BY_CODE: dict[str, type[AgentError]] = {
    cls.code_name: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def from_rpc_error(error: grpc.RpcError, method: str = "") -> AgentError:
    """The ``AgentError`` subclass for a failed call, keeping the server's message."""
    import grpc

    # A failed call is also a grpc.Call with code() and details(); a bare
    # RpcError (rare: raised by channel internals) has neither.
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code.name, AgentError)
    return cls(details or code.name.lower(), code=code, method=method)


class SandboxError(BulkheadError):
    """A sandbox could not be created, found or driven."""


class SandboxNotFound(SandboxError):
    """No sandbox of that name exists in the state directory."""


class SandboxExists(SandboxError):
    """A live sandbox of that name already exists."""


class BootError(SandboxError):
    """The sandbox did not come up; the message ends with the console log's tail."""

    def __init__(self, message: str, console_tail: str = "", monitor_tail: str = "") -> None:
        self.console_tail = console_tail
        self.monitor_tail = monitor_tail
        parts = [message]
        if monitor_tail.strip():
            parts.append("--- monitor log (tail) ---\n" + monitor_tail.rstrip())
        if console_tail.strip():
            parts.append("--- console log (tail) ---\n" + console_tail.rstrip())
        super().__init__("\n".join(parts))


class QemuError(SandboxError):
    """QEMU or its QMP monitor refused or failed a request."""


class ImageNotFound(BulkheadError):
    """No guest image where one was expected."""


class ProcessTimeout(BulkheadError, TimeoutError):
    """A container process did not exit within the time ``wait()`` was given."""


class StdioError(BulkheadError):
    """A process's output stream broke the protocol (a gap in its offsets, a second exit)."""


class SpecError(BulkheadError, ValueError):
    """Options that cannot become an OCI runtime spec (a bad size, user or limit)."""
