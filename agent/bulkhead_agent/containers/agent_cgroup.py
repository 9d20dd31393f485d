"""The agent's own cgroup v2 subtree, set up first thing, before the spawner is forked.

Layout (DESIGN decisions 3 and 6)::

    /sys/fs/cgroup/                 root: init (exempt from the no-internal-processes rule)
        bulkhead/                   no processes; controllers enabled for its children
            agent/                  the agent and its spawner
            containers/             no processes; controllers enabled for its children
                <container id>/     one container (and whatever groups it makes below)

cgroup v2 lets only leaves hold processes once controllers are enabled below a group, so the
agent moves itself into ``bulkhead/agent`` before enabling anything in ``bulkhead/``, and
before it forks the spawner, which then starts out there too. Containers never share the
agent's group, so their limits, freezing and cgroup.kill never touch it.

Without a cgroup2 hierarchy (a cgroup v1 host, in native tests) there is no tree: containers
run without cgroups and the agent says so once.

Only ``os`` here: this runs before the fork, so whatever it imports the agent pays for
serially at every boot.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bulkhead_init.log import Logger

# As oci.cgroups.CONTROLLERS (not imported: it brings the whole spec module along).
CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids", "hugetlb", "misc", "rdma")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _enable(group: str, log: Logger) -> None:
    available = _read(os.path.join(group, "cgroup.controllers")).split()
    enabled = _read(os.path.join(group, "cgroup.subtree_control")).split()
    for controller in CONTROLLERS:
        if controller in available and controller not in enabled:
            # One at a time: one the kernel refuses must not cost the others.
            try:
                with open(os.path.join(group, "cgroup.subtree_control"), "w") as f:
                    f.write(f"+{controller}")
            except OSError as exc:
                log.warning(f"cannot enable cgroup controller {controller} in {group}: {exc}")


def setup(directory: str, log: Logger) -> str | None:
    """Create the tree, move this process into ``agent/``, hand the controllers down.

    Returns ``directory``, or None (and logs why, once) when there is no cgroup2 hierarchy
    to use.
    """
    parent = os.path.dirname(directory)
    if not os.path.exists(os.path.join(parent, "cgroup.controllers")):
        log.info(f"no cgroup v2 hierarchy at {parent}: containers run without cgroups")
        return None
    agent = os.path.join(directory, "agent")
    containers = os.path.join(directory, "containers")
    try:
        os.makedirs(agent, 0o755, exist_ok=True)
        with open(os.path.join(agent, "cgroup.procs"), "w") as f:
            f.write("0")  # the writing process, with all its threads (there is one yet)
        os.makedirs(containers, 0o755, exist_ok=True)
    except OSError as exc:
        log.warning(f"cannot set up {directory}: {exc}; containers run without cgroups")
        return None
    for group in (directory, containers):
        # A group that enables controllers for its children must hold no process itself
        # (an older agent's, say): then it stays without, and says so.
        stray = _read(os.path.join(group, "cgroup.procs")).split()
        if stray:
            log.warning(f"{group} holds processes {' '.join(stray)}: its controllers stay off")
            continue
        _enable(group, log)
    offered = _read(os.path.join(containers, "cgroup.subtree_control")).strip()
    log.info(f"cgroup v2: agent in {agent}; controllers for containers: {offered or 'none'}")
    return directory
