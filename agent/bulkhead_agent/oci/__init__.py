"""The OCI runtime spec in the guest: validation (``spec``), cgroup v2 mapping and control
(``cgroups``), safe paths inside a root filesystem (``paths``) and the ordered container-setup
steps a spawner child runs before exec (``setup``)."""
