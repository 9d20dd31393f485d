"""Bulkhead guest PID 1.

Mounts, modules, entropy, hostname, agent supervision, reaping, power-off.
"""
