"""Files copied in from the host: written in chunks to a hidden temporary file next to the
destination, then given their mode and owner, synced, and renamed into place.

Readers never see half a file: until the rename the destination is the old file (or
nothing). The destination's directory is resolved beneath the storage's root (see
``confine``), and the rename happens inside that directory's descriptor, so neither a
``..`` nor a symlink swapped in while the data streams can send the file elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat

from ..containers.errors import Failure
from . import confine

MAX_MODE = 0o7777


class FileCopy:
    """One file being written; ``write`` the chunks, then ``finish`` (or ``abort``)."""

    def __init__(
        self,
        root: str,
        path: str,
        *,
        size: int,
        mode: int,
        uid: int,
        gid: int,
        make_parents: bool = False,
    ) -> None:
        if mode & ~MAX_MODE:
            raise Failure("INVALID_ARGUMENT", f"mode: {mode:#o} has bits beyond 07777")
        try:
            names = confine.components(path)
        except confine.PathRefused as exc:
            raise Failure("INVALID_ARGUMENT", str(exc)) from None
        self.name = names[-1]
        self.size = size
        self.written = 0
        self._mode, self._uid, self._gid = mode, uid, gid
        self._tmp = f".{self.name[:200]}.bulkhead-{secrets.token_hex(4)}"
        self._fd = -1
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._dir = confine.open_dir(
                root_fd,
                names[:-1],
                create=make_parents,
                owner=(uid, gid),
                field="path",
            )
        except confine.PathRefused as exc:
            raise Failure("INVALID_ARGUMENT", str(exc)) from None
        except FileNotFoundError:
            raise Failure(
                "FAILED_PRECONDITION",
                f"path: the directory of {path!r} does not exist (set make_parents)",
            ) from None
        finally:
            os.close(root_fd)
        self.directory = confine.real_path(self._dir)
        try:
            existing = os.stat(self.name, dir_fd=self._dir, follow_symlinks=False)
            if stat.S_ISDIR(existing.st_mode):
                raise Failure("FAILED_PRECONDITION", f"path: {path!r} is a directory")
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(self._dir)
            raise
        try:
            self._fd = os.open(
                self._tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self._dir,
            )
        except OSError as exc:
            os.close(self._dir)
            raise Failure("FAILED_PRECONDITION", f"path: {path!r}: {exc.strerror}") from None

    @property
    def destination(self) -> str:
        return os.path.join(self.directory, self.name)

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.size:
            raise Failure(
                "INVALID_ARGUMENT",
                f"data: more than the {self.size} bytes announced in size",
            )
        view = memoryview(data)
        while view:
            count = os.write(self._fd, view)
            view = view[count:]
        self.written += len(data)

    async def finish(self) -> str:
        """Check the size, set owner and mode, sync, rename into place; the final path."""
        if self.written != self.size:
            raise Failure(
                "INVALID_ARGUMENT",
                f"data: the stream ended after {self.written} of {self.size} bytes",
            )
        # chown first: it clears setuid/setgid bits that fchmod then sets.
        os.fchown(self._fd, self._uid, self._gid)
        os.fchmod(self._fd, self._mode)
        await asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)
        os.close(self._fd)
        self._fd = -1
        os.rename(self._tmp, self.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        self._tmp = ""
        with contextlib.suppress(OSError):
            os.fsync(self._dir)  # the rename itself survives a crash
        os.close(self._dir)
        self._dir = -1
        return self.destination

    def abort(self) -> None:
        """Drop the temporary file; the destination stays as it was."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir >= 0:
            if self._tmp:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp, dir_fd=self._dir)
            os.close(self._dir)
            self._dir = -1
