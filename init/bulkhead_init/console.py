"""The debug console: a root shell on the console, for ``bulkhead.debug_console=on`` only.

The shell runs as a session leader with the console as its controlling terminal, so job
control and ^C work; init restarts it whenever it exits.
"""

from __future__ import annotations

from . import spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

SHELL = "/bin/sh"


def spawn_shell(tty: str, env: Mapping[str, str], shell: str = SHELL) -> int:
    return spawn.spawn([shell], env, tty=tty)
