"""The sandbox's network inside the guest, as the host specified it.

- ``spec``: requests turned into checked plain values; every error names its field.
- ``pyroute``: pyroute2, imported at the first network request and only the parts we use.
- ``kernel``: reading and changing links, addresses, routes and neighbours over netlink.
- ``hotplug``: waiting, with a deadline, for a NIC to appear (RTM_NEWLINK).
- ``snapshot``: what a change touches, captured before and put back on failure.
- ``apply``: checks a request against the kernel's state, applies it, rolls it back.
- ``sysctl``: IPv6 autoconfiguration off on the interfaces a request configures.
- ``files``: the sandbox's resolv.conf, hosts and hostname, and their binds into containers.

Nothing here but ``pyroute`` and ``kernel`` imports pyroute2, and those only when a network
request comes: the agent starts with ``files`` and ``pyroute`` alone (DESIGN decision 9).
"""
