"""Storage in the guest: disks the host hot-plugged (found through uevents and sysfs by PCI
path or serial), shares, tmpfs, local directories and overlays, mounted under a directory
the agent owns; file copies into them. ``manager.StorageManager`` is the entry point;
``services.storage`` serves it over gRPC. Nothing here imports gRPC.
"""
