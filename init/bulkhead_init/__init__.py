"""Bulkhead guest PID 1.

Mounts, modules, entropy, hostname, agent supervision, reaping, power-off.
"""

# Kept in step with pyproject.toml's version by tests/test_init_imports.py; read from here
# because importlib.metadata is far too heavy for PID 1.
__version__ = "0.1.0"
