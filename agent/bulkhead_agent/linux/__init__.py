"""Thin, typed wrappers for the Linux system calls Python 3.11's stdlib lacks.

Each module covers one area (namespaces, mounts, prctl, capabilities, ...). Every wrapper
raises ``OSError`` carrying the C errno and a message that names the call and its
arguments, so a failure deep in container setup still says exactly what was attempted.
"""
